"""loraplex: one NF4 base model, many low-rank adapters per continuously batched step.

Subpackages: `loraplex.server` (gRPC, engine, model runner, CLI), `loraplex.kernels`
(Triton kernels with torch references), `loraplex.adapters` (formats, store, pool,
trainer), `loraplex.v1` (generated gRPC stubs).
"""

__version__ = "0.1.0"
