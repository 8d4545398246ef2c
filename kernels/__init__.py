"""Adapter and base-model kernels. Each op file holds a Triton kernel, its launcher and
a plain-torch reference (`<op>_ref`, whose docstring is the op's Semantics).
`backend.py` picks the implementation once per device."""
