"""`loraplex train`: makes PEFT-format adapters on the NF4 base."""
