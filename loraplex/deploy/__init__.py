"""loraplex on Ray Serve: N replicas of the engine (replica.py) behind a thin HTTP ingress
that routes each request by its body's `model` through model multiplexing (router.py),
adapters in a shared store every replica reads (shared_store.py). Needs the `ray` extra: `pip install 'loraplex[ray]'`.

    serve run loraplex.deploy:app replicas=2                  # or a config file (README)
    loraplex serve-ray --replicas 2 --num-gpus-per-replica 1  # the same, one command
    loraplex serve-ray --replicas 2 --grpc-port 9000          # also loraplex.v1.Generation over gRPC

    app = build_app({"replicas": 2, "num_cpus_per_replica": 0.5, "adapter_root": "/shared/adapters"})
    serve.start(grpc_options=grpc_options(9000))             # gRPC: Ray Serve's gRPC proxy (grpc_bridge.py)
    serve.run(app, name="loraplex", route_prefix="/")

`build_app` takes the flags of `loraplex serve-ray` as a dict (dashes as underscores:
`adapter_slots`, `max_running`, ...), so a Serve config file's `args:` are those flags.
Only this package imports ray; nothing on the engine's path does.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

# flags of `loraplex serve-ray` that are not ServeConfig's
ROUTER_CPUS = 0.1
DEPLOY_KEYS = ("replicas", "num_gpus_per_replica", "num_cpus_per_replica", "replica_metrics_port", "metrics_sd_dir",
               "grpc_port")  # fmt: skip


def grpc_options(port: int | None, request_timeout_s: float | None = None):
    """Ray Serve's gRPCOptions serving loraplex.v1.Generation on `port` (None: no gRPC),
    for serve.start(grpc_options=...)."""
    from loraplex.deploy import grpc_bridge

    return grpc_bridge.grpc_options(port, request_timeout_s)


def serve_args(args: dict | None = None):
    """The argparse namespace of `loraplex serve-ray` with `args` over its defaults
    (ValueError for a key that is not one of its flags)."""
    from loraplex.server.cli import build_parser

    ns = build_parser(["serve-ray"]).parse_args(["serve-ray"])
    for key, value in (args or {}).items():
        key = key.replace("-", "_")
        if key in ("func", "command") or not hasattr(ns, key):
            raise ValueError(f"unknown loraplex serve-ray option {key!r}")
        setattr(ns, key, value)
    for key in ("model", "adapter_root", "tls_cert", "tls_key", "tls_client_ca"):
        if getattr(ns, key) is not None:
            setattr(ns, key, Path(getattr(ns, key)))
    if isinstance(ns.api_token, str):
        ns.api_token = [ns.api_token]
    return ns


def build_app(args: dict | None = None):
    """A Ray Serve application: the LoraplexRouter ingress in front of `replicas`
    LoraplexReplica replicas (the builder that `serve run loraplex.deploy:app` calls with
    the config file's `args`)."""
    from loraplex.deploy.replica import LoraplexReplica
    from loraplex.deploy.router import LoraplexRouter
    from loraplex.server.app import seed_bundled_adapters
    from loraplex.server.cli import serve_config_from_args

    ns = args if not isinstance(args, dict) and args is not None else serve_args(args)
    if ns.replicas < 1:
        raise ValueError(f"replicas must be ≥ 1, got {ns.replicas}")
    config = serve_config_from_args(ns)
    if config.tls:
        raise ValueError("TLS is Ray Serve's proxy's business on Ray (or a load balancer in front); drop --tls-*")
    root = config.engine.adapter_root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    if not ns.no_demo_adapters:
        seed_bundled_adapters(root)
    gpus = float(ns.num_gpus_per_replica)
    cpus = float(ns.num_cpus_per_replica) if ns.num_cpus_per_replica is not None else 1.0
    replica_metrics_port = None if ns.no_metrics else ns.replica_metrics_port
    engine = config.engine
    per_replica = engine.max_running + engine.max_queue
    replicas = LoraplexReplica.options(
        num_replicas=ns.replicas,
        ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
        # the engine queues and refuses (429) by itself: Ray only needs to let requests through
        max_ongoing_requests=per_replica,
        graceful_shutdown_timeout_s=config.shutdown_grace_s,
        health_check_period_s=5.0,
        health_check_timeout_s=30.0,
    ).bind(config, replica_metrics_port, ns.metrics_sd_dir)
    base_model = config.served_model_name or Path(config.engine.model_dir).name
    # the HTTP ingress: routes by the body's `model` (router.py); it only forwards, so a
    # tenth of a CPU, and it lets through whatever the replicas together would take
    return LoraplexRouter.options(
        num_replicas=1,
        ray_actor_options={"num_cpus": ROUTER_CPUS},
        max_ongoing_requests=max(100, 2 * per_replica * ns.replicas),
        graceful_shutdown_timeout_s=config.shutdown_grace_s,
    ).bind(replicas, base_model, config.max_receive_message_bytes)


app = build_app  # `serve run loraplex.deploy:app [key=value ...]` or a config file's import_path
