"""Adapter formats (PEFT on disk), conversion to the one form, store, pool, trainer."""
