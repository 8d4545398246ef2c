"""The `loraplex` command: serve, generate, adapters, train.

argparse lives here and only here; each subcommand turns its arguments into a config
(ServeConfig/EngineConfig) or a client call. Heavy imports (torch, the engine, the
trainer) happen inside the subcommand that needs them, so `loraplex generate` and
`loraplex --help` stay quick.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from dataclasses import asdict
from pathlib import Path

DEFAULT_TARGET = "127.0.0.1:50051"
ENV_ADMIN_TOKEN = "LORAPLEX_ADMIN_TOKEN"
ENV_API_TOKENS = "LORAPLEX_API_TOKENS"  # serve: comma-separated
ENV_API_TOKEN = "LORAPLEX_API_TOKEN"  # generate: the one to send
ENV_ADAPTER_ROOT = "LORAPLEX_ADAPTER_ROOT"
ENV_TARGET = "LORAPLEX_TARGET"

# EngineConfig's defaults, repeated here so `--help` shows them without importing torch;
# tests/server/test_cli.py checks that they match.
ENGINE_DEFAULTS = {
    "quantize": "nf4",
    "device": "auto",
    "max_batch_tokens": 2048,
    "max_running": 64,
    "max_queue": 256,
    "kv_cache_tokens": 16384,
    "adapter_slots": 16,
    "adapter_pool_bytes": 256 << 20,
    "max_rank": 64,
    "max_new_tokens": 4096,
    "lora_backend": "auto",
    "kernel_backend": "auto",
    "cuda_graphs": True,
    "overlap_steps": "auto",
    "host_cache_bytes": 1 << 30,
    "vera_form": "shared",
    "nf4_backend": "bnb",
    "cpu_threads": None,
}

_EPILOG = f"""\
environment:
  {ENV_ADMIN_TOKEN}   admin token (serve: the token to require; clients: the token to send)
  {ENV_API_TOKENS}    serve: comma-separated API tokens that generation then requires
  {ENV_API_TOKEN}     generate: the API token to send (default: the admin token, if set)
  {ENV_ADAPTER_ROOT}  adapter root of `serve` (default: $XDG_DATA_HOME/loraplex/adapters)
  {ENV_TARGET}        server address of the client commands (default {DEFAULT_TARGET})
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps our line breaks; shows defaults, except None/False ones that the help explains."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default in ([], ""):
            return action.help
        return super()._get_help_string(action)


def default_adapter_root() -> Path:
    if os.environ.get(ENV_ADAPTER_ROOT):
        return Path(os.environ[ENV_ADAPTER_ROOT]).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "loraplex" / "adapters"


# -- serve --------------------------------------------------------------------------------
def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="run the server (gRPC and the OpenAI-compatible HTTP API)",
        description=f"""\
Serve one base model and the adapters under the adapter root over gRPC
(loraplex.v1.Generation, loraplex.v1.AdapterAdmin, grpc.health.v1, server
reflection) and over an OpenAI-compatible HTTP API (/v1/completions,
/v1/chat/completions, /v1/models; `model` = an adapter id, <base>:<adapter> or
the base), with Prometheus metrics over HTTP. With no arguments: the bundled
tiny model and its demo adapters, on 127.0.0.1:50051 (HTTP API :8000, metrics
:9090). Both front ends share the engine, the limits, the tokens and TLS.

Adapters found under the adapter root are registered on start; uploads are
stored there and so survive a restart.

Admin API (upload/load/unload/list/get adapters): set --admin-token or
${ENV_ADMIN_TOKEN}; callers send metadata 'authorization: Bearer <token>'
(missing: UNAUTHENTICATED, wrong: PERMISSION_DENIED). Without a token the
admin API is refused (PERMISSION_DENIED), unless --insecure-admin is given,
which is accepted only with a loopback --host.

Generation (Generate, GenerateStream) is open to every caller unless API tokens
are set (--api-token, repeatable, or ${ENV_API_TOKENS}, comma-separated): then
it needs one of them or the admin token (else UNAUTHENTICATED), and an API token
calling an admin RPC gets PERMISSION_DENIED. Health and reflection stay open.

Over HTTP the same tokens go in the header 'Authorization: Bearer <token>'
(missing or wrong API token: 401; a token that may not call the admin API: 403);
POST /v1/load_lora_adapter and /v1/unload_lora_adapter need the admin token.

TLS: --tls-cert and --tls-key make the gRPC and HTTP API ports TLS-only;
--tls-client-ca also requires client certificates signed by that CA (mutual
TLS). Tokens travel in metadata and headers: without TLS, keep --host on
loopback. The metrics port stays plain HTTP.

SIGTERM or SIGINT drains: health turns NOT_SERVING (HTTP /health: 503), new
requests get UNAVAILABLE (HTTP 503), running ones finish within --shutdown-grace seconds (the rest are
cancelled), and the process exits 0. A second signal exits at once (status 1).""",
        formatter_class=_HelpFormatter,
    )
    add_serve_flags(p)
    p.set_defaults(func=_serve)


def add_serve_flags(p) -> None:
    """The flags of `serve`, shared by `serve-ray`."""
    p.add_argument("--model", type=Path, default=None, help="Hugging Face model directory (default: the bundled tiny-llama)")
    p.add_argument("--adapter-root", type=Path, default=None,
                   help=f"directory of PEFT adapter directories; uploads are stored here (default: ${ENV_ADAPTER_ROOT} or {default_adapter_root()})")
    p.add_argument("--no-demo-adapters", action="store_true", help="do not copy the bundled demo adapters into the adapter root")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (gRPC, HTTP API and metrics); 0.0.0.0 or :: for all interfaces")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0 = any free port, printed on start)")
    p.add_argument("--http-port", type=int, default=8000, help="OpenAI-compatible HTTP API port (0 = any free port)")
    p.add_argument("--no-http", action="store_true", help="do not serve the HTTP API")
    p.add_argument("--served-model-name", default=None, help="the base model's id over HTTP (default: the model directory's name)")
    p.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics HTTP port (0 = any free port)")
    p.add_argument("--no-metrics", action="store_true", help="do not serve metrics over HTTP")
    p.add_argument("--metrics-max-adapters", type=int, default=100,
                   help='per-adapter request series on /metrics: the busiest N by id, the rest summed as adapter="_other"')
    p.add_argument("--admin-token", default=None, help=f"token required by admin RPCs (default: ${ENV_ADMIN_TOKEN}, preferable: a command line is visible to other users)")
    p.add_argument("--insecure-admin", action="store_true", help="allow admin RPCs without a token (loopback --host only; development)")
    p.add_argument("--api-token", action="append", default=[], metavar="TOKEN",
                   help=f"token that generation calls must send (repeatable; default: ${ENV_API_TOKENS}, comma-separated, "
                        "preferable for the same reason; none = generation open to all)")
    p.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain of the server (with --tls-key: TLS only)")
    p.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", type=Path, default=None, help="PEM CA that client certificates must be signed by (mutual TLS)")
    e = p.add_argument_group("engine")
    d = ENGINE_DEFAULTS
    e.add_argument("--quantize", choices=("nf4", "none"), default=d["quantize"], help="base model weights: 4-bit NF4 or unquantized")
    e.add_argument("--device", default=d["device"], help="torch device; auto = cuda if available, else cpu")
    e.add_argument("--max-batch-tokens", type=int, default=d["max_batch_tokens"], help="tokens per engine step (prefill chunks + decode)")
    e.add_argument("--max-running", type=int, default=d["max_running"], help="requests in the running batch")
    e.add_argument("--max-queue", type=int, default=d["max_queue"], help="waiting requests before RESOURCE_EXHAUSTED")
    e.add_argument("--kv-cache-tokens", type=int, default=d["kv_cache_tokens"], help="KV cache size in tokens")
    e.add_argument("--adapter-slots", type=int, default=d["adapter_slots"], help="adapters resident on the device at once (each also takes rank pages from the pool)")
    e.add_argument("--adapter-pool-mb", type=int, default=d["adapter_pool_bytes"] >> 20, help="device memory of the adapter pool, MiB: adapters take it by rank, in pages of 16 rank rows per target module")
    e.add_argument("--max-rank", type=int, default=d["max_rank"], help="largest adapter rank accepted")
    e.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"], help="cap on a request's max_new_tokens")
    e.add_argument("--lora-backend", choices=("auto", "torch", "triton"), default=d["lora_backend"],
                   help="adapter shrink/expand ops: auto = Triton on CUDA, the torch reference on CPU")
    e.add_argument("--kernel-backend", choices=("auto", "torch", "triton"), default=d["kernel_backend"],
                   help="attention, RoPE + KV-cache write, RMSNorm, SiLU·up: auto = Triton on CUDA, the torch references on CPU")
    e.add_argument("--cuda-graphs", choices=("on", "off"), default="on" if d["cuda_graphs"] else "off",
                   help="capture pure decode steps as CUDA graphs per batch-size bucket at start (CUDA only; "
                        "the capture time and memory are logged and on /metrics)")
    e.add_argument("--overlap-steps", choices=("auto", "on", "off"), default=d["overlap_steps"],
                   help="launch each step before reading the previous step's tokens, so streaming, stop checks and "
                        "scheduling run while the GPU computes (auto = on with CUDA; same tokens either way)")
    e.add_argument("--host-cache-mb", type=int, default=d["host_cache_bytes"] >> 20,
                   help="host memory for adapters converted and staged for the device (pinned on CUDA), MiB; LRU")
    e.add_argument("--vera-form", choices=("shared", "folded"), default=d["vera_form"],
                   help="VeRA adapters: shared = each frozen projection stored once (an adapter costs its two vectors); "
                        "folded = per-adapter factors, like a LoRA of the same rank")
    e.add_argument("--cpu-threads", type=int, default=d["cpu_threads"],
                   help="torch threads for the engine on CPU (default: every core but one; 1 is fastest for the tiny model)")
    e.add_argument("--nf4-backend", choices=("bnb", "auto", "triton"), default=d["nf4_backend"],
                   help="NF4 base matmul: bitsandbytes, or our fused Triton kernel (auto: where its shape policy picks it)")
    p.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds running requests get to finish on SIGTERM")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def serve_config_from_args(args):
    from loraplex.server.app import ServeConfig, bundled_model_dir
    from loraplex.server.engine.config import EngineConfig

    engine = EngineConfig(
        model_dir=args.model or bundled_model_dir(),
        adapter_root=args.adapter_root or default_adapter_root(),
        quantize=args.quantize,
        device=args.device,
        max_batch_tokens=args.max_batch_tokens,
        max_running=args.max_running,
        max_queue=args.max_queue,
        kv_cache_tokens=args.kv_cache_tokens,
        adapter_slots=args.adapter_slots,
        adapter_pool_bytes=args.adapter_pool_mb << 20,
        max_rank=args.max_rank,
        max_new_tokens=args.max_new_tokens,
        lora_backend=args.lora_backend,
        kernel_backend=args.kernel_backend,
        cuda_graphs=args.cuda_graphs == "on",
        overlap_steps=args.overlap_steps,
        host_cache_bytes=args.host_cache_mb << 20,
        vera_form=args.vera_form,
        nf4_backend=args.nf4_backend,
        cpu_threads=args.cpu_threads,
    )
    return ServeConfig(
        engine=engine,
        host=args.host,
        port=args.port,
        metrics_port=None if args.no_metrics else args.metrics_port,
        http_port=None if args.no_http else args.http_port,
        served_model_name=args.served_model_name,
        admin_token=args.admin_token or os.environ.get(ENV_ADMIN_TOKEN) or None,
        insecure_admin=args.insecure_admin,
        api_tokens=tuple(args.api_token) or api_tokens_from_env(),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        shutdown_grace_s=args.shutdown_grace,
        metrics_max_adapters=args.metrics_max_adapters,
    )


def api_tokens_from_env() -> tuple[str, ...]:
    return tuple(t.strip() for t in os.environ.get(ENV_API_TOKENS, "").split(",") if t.strip())


def _serve(args) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("loraplex")
    from loraplex.server.app import LoraplexServer, is_loopback, seed_bundled_adapters
    from loraplex.server.grpc.tls import server_credentials

    try:
        config = serve_config_from_args(args)
        if config.tls:  # read the files now: a wrong one fails before the model loads
            server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
    except ValueError as e:  # TlsError is one
        print(f"loraplex serve: {e}", file=sys.stderr)
        return 2
    root = config.engine.adapter_root
    root.mkdir(parents=True, exist_ok=True)
    if not args.no_demo_adapters:
        copied = seed_bundled_adapters(root)
        if copied:
            log.info("copied demo adapters %s into %s", ", ".join(copied), root)
    if config.admin_token is None and not config.insecure_admin:
        log.warning("no admin token: the admin API is disabled (set --admin-token or $%s)", ENV_ADMIN_TOKEN)
    if (config.admin_token or config.api_tokens) and not config.tls and not is_loopback(config.host):
        log.warning("tokens are sent in plaintext to %s: add --tls-cert and --tls-key", config.host)

    stop = threading.Event()
    signals = {"count": 0}

    def on_signal(signum, frame):
        signals["count"] += 1
        if signals["count"] > 1:
            log.warning("second signal: exiting without waiting")
            os._exit(1)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    server = LoraplexServer(config)
    server.start()
    metrics = f"http://{config.host}:{server.metrics_port}/metrics" if server.metrics_port else "off"
    http = f"{server.http_url}/v1" if server.http_url else "off"
    print(f"loraplex listening on {server.target} (HTTP API: {http}; metrics: {metrics}); warming up", flush=True)
    server.warm_up()
    print(f"loraplex serving on {server.target} (HTTP API: {http})", flush=True)
    while not stop.wait(0.2):
        pass
    log.info("draining (grace %.1fs)", config.shutdown_grace_s)
    server.stop(config.shutdown_grace_s)
    print("loraplex stopped", flush=True)
    return 0


# -- serve-ray ------------------------------------------------------------------------------
def _add_serve_ray(sub) -> None:
    p = sub.add_parser(
        "serve-ray",
        help="run replicas of the server on Ray Serve (the `ray` extra)",
        description="""\
Serve the same model and adapters as `serve`, as --replicas replicas on Ray Serve
(loraplex.deploy): each replica is one engine on one GPU (--num-gpus-per-replica)
or a share of the CPU. Requests are routed by adapter through Ray Serve model
multiplexing: send the adapter in the header 'serve_multiplexed_model_id' for
replica affinity (the body's `model` still decides what is served). Adapters live
in the shared --adapter-root that every replica reads: an upload through any
replica is served by all, an unload or replace reaches all at their next request.
The HTTP API is Ray Serve's proxy on --host/--http-port; loraplex.v1.Generation is
Ray Serve's gRPC proxy on --grpc-port (none without it; --port is unused). Each
replica serves its own Prometheus metrics (label `replica`) on
--replica-metrics-port (0 = any free port; --metrics-sd-dir writes Prometheus
file_sd targets). With --ray-address, joins that cluster (`ray start
--head` on the first machine); otherwise starts a local Ray instance.""",
        formatter_class=_HelpFormatter,
    )
    add_serve_flags(p)
    r = p.add_argument_group("ray")
    r.add_argument("--replicas", type=int, default=1, help="engine replicas")
    r.add_argument("--num-gpus-per-replica", type=float, default=0.0, help="GPUs per replica (1 for one engine per GPU)")
    r.add_argument("--num-cpus-per-replica", type=float, default=None, help="CPUs per replica (default 1; fractions share a CPU)")
    r.add_argument("--ray-address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local instance)")
    r.add_argument("--ray-num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    r.add_argument("--replica-metrics-port", type=int, default=0, help="each replica's Prometheus port (0 = any free port)")
    r.add_argument("--metrics-sd-dir", default=None, help="directory for Prometheus file_sd target files, one per replica")
    r.add_argument("--app-name", default="loraplex", help="the Ray Serve application name")
    r.add_argument("--grpc-port", type=int, default=None, help="Ray Serve's gRPC proxy port for loraplex.v1.Generation")
    p.set_defaults(func=_serve_ray)


def _serve_ray(args) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import ray
        from ray import serve

        from loraplex.deploy import build_app, grpc_options
    except ImportError as e:
        print(f"loraplex serve-ray needs the ray extra (pip install 'loraplex[ray]'): {e}", file=sys.stderr)
        return 2
    try:
        application = build_app(args)
    except ValueError as e:
        print(f"loraplex serve-ray: {e}", file=sys.stderr)
        return 2
    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    ray.init(address=address, num_cpus=None if address else args.ray_num_cpus, include_dashboard=False)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": 8000 if args.http_port is None else args.http_port},
                    grpc_options=grpc_options(args.grpc_port))
        serve.run(application, name=args.app_name, route_prefix="/")
        print(f"loraplex serving {args.replicas} replica(s) on Ray Serve: http://{args.host}:{args.http_port}/v1", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        serve.delete(args.app_name)
        if not address:
            serve.shutdown()
        ray.shutdown()
    print("loraplex stopped", flush=True)
    return 0


# -- client commands ------------------------------------------------------------------------
def _add_target(p, admin: bool) -> None:
    p.add_argument("--target", default=os.environ.get(ENV_TARGET, DEFAULT_TARGET), help="server address host:port")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before the call is abandoned")
    if admin:
        p.add_argument("--admin-token", default=None, help=f"admin token (default: ${ENV_ADMIN_TOKEN})")
    else:
        p.add_argument("--api-token", default=None,
                       help=f"API token, for servers that require one (default: ${ENV_API_TOKEN}, else ${ENV_ADMIN_TOKEN})")
    t = p.add_argument_group("TLS")
    t.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's root certificates")
    t.add_argument("--tls-ca", type=Path, default=None, help="connect with TLS, trusting this PEM CA (implies --tls)")
    t.add_argument("--tls-cert", type=Path, default=None, help="PEM client certificate, for servers that require one (with --tls-key)")
    t.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")


def _client(args):
    from loraplex.client import LoraplexClient

    admin_token = getattr(args, "admin_token", None) or os.environ.get(ENV_ADMIN_TOKEN) or None
    api_token = getattr(args, "api_token", None) or os.environ.get(ENV_API_TOKEN) or None
    return LoraplexClient(args.target, admin_token=admin_token, api_token=api_token, timeout=args.timeout,
                          tls=args.tls, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key)  # fmt: skip


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text through a running server",
                       description="Send one Generate (or, with --stream, GenerateStream) request.",
                       formatter_class=_HelpFormatter)
    p.add_argument("prompt", help="prompt text")
    p.add_argument("--adapter", default="", help="adapter id (empty = base model)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate at most (default: server's, 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=None, help="nucleus mass in (0, 1] (default: off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    _add_target(p, admin=False)
    p.set_defaults(func=_generate)


def _generate(args) -> int:
    params = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, seed=args.seed, stop=args.stop)
    with _client(args) as client:
        if args.stream:
            last = None
            for chunk in client.generate_stream(args.prompt, args.adapter, **params):
                if not args.json:
                    print(chunk.text, end="", flush=True)
                last = chunk
            if args.json:
                print(json.dumps(asdict(last)))
            else:
                print()
        else:
            result = client.generate(args.prompt, args.adapter, **params)
            print(json.dumps(asdict(result)) if args.json else result.text)
    return 0


def _add_adapters(sub) -> None:
    p = sub.add_parser("adapters", help="manage the adapters of a running server (admin token)",
                       description=f"Admin calls; they send the admin token from --admin-token or ${ENV_ADMIN_TOKEN}.")
    asub = p.add_subparsers(dest="adapters_command", required=True, metavar="{upload,load,list,get,unload}")
    up = asub.add_parser("upload", help="upload a PEFT adapter directory in chunks and register it")
    up.add_argument("adapter_id")
    up.add_argument("directory", type=Path, help="local directory with adapter_config.json and adapter_model.safetensors")
    up.add_argument("--replace", action="store_true", help="replace an adapter with the same id")
    up.add_argument("--chunk-mb", type=float, default=1.0, help="chunk size in MiB")
    ld = asub.add_parser("load", help="register an adapter directory that is already on the server, under its adapter root")
    ld.add_argument("adapter_id")
    ld.add_argument("path", help="server-side path, absolute or relative to the adapter root")
    ld.add_argument("--replace", action="store_true")
    ls = asub.add_parser("list", help="list registered adapters")
    ls.add_argument("--json", action="store_true")
    get = asub.add_parser("get", help="show one adapter")
    get.add_argument("adapter_id")
    un = asub.add_parser("unload", help="unregister an adapter (requests in flight finish)")
    un.add_argument("adapter_id")
    un.add_argument("--delete", action="store_true", help="also delete its stored files, so it does not return on restart")
    for q in (up, ld, ls, get, un):
        _add_target(q, admin=True)
    p.set_defaults(func=_adapters)


def _adapters(args) -> int:
    with _client(args) as client:
        cmd = args.adapters_command
        if cmd == "upload":
            info = client.upload_adapter(args.adapter_id, args.directory, replace=args.replace,
                                         chunk_size=max(1, int(args.chunk_mb * (1 << 20))))
            print(json.dumps(asdict(info), indent=2))
        elif cmd == "load":
            print(json.dumps(asdict(client.load_adapter(args.adapter_id, args.path, replace=args.replace)), indent=2))
        elif cmd == "get":
            print(json.dumps(asdict(client.get_adapter(args.adapter_id)), indent=2))
        elif cmd == "unload":
            client.unload_adapter(args.adapter_id, delete_files=args.delete)
            print(f"unloaded {args.adapter_id}")
        else:
            adapters = client.list_adapters()
            if args.json:
                print(json.dumps([asdict(a) for a in adapters], indent=2))
            else:
                print(f"{'ID':24} {'TYPE':8} {'RANKS':>9} {'SIZE':>10} RESIDENT")
                for a in adapters:
                    ranks = sorted({r for rs in a.ranks.values() for r in rs})
                    span = f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else (str(ranks[0]) if ranks else "-")
                    print(f"{a.adapter_id:24} {a.adapter_type:8} {span:>9} {a.size_bytes:>10} {'yes' if a.resident else 'no'}")
    return 0


# -- train (mounted from the trainer, imported only when asked for) -------------------------
def _add_train(sub, wanted: bool) -> None:
    p = sub.add_parser("train", help="train an adapter (loraplex.adapters.train)")
    if not wanted:  # its arguments are the trainer's; only loaded when `train` is the command
        return
    try:
        from loraplex.adapters.train.cli import add_train_arguments, run_train
    except ImportError as e:
        error = e  # `e` is unbound after the except block
        p.set_defaults(func=lambda args: _missing_trainer(error))
        return
    add_train_arguments(p)
    p.set_defaults(func=run_train)


def _missing_trainer(error: Exception) -> int:
    print(f"loraplex train is not available: {error}", file=sys.stderr)
    return 2


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraplex",
        description="A multi-adapter LLM server: one NF4 base model, many LoRA/DoRA/VeRA/AdaLoRA adapters per batch.",
        epilog=_EPILOG,
        formatter_class=_HelpFormatter,
    )
    from loraplex import __version__

    parser.add_argument("--version", action="version", version=f"loraplex {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,serve-ray,generate,adapters,train}")
    _add_serve(sub)
    _add_serve_ray(sub)
    _add_generate(sub)
    _add_adapters(sub)
    _add_train(sub, wanted=bool(argv) and argv[0] == "train")
    return parser


def main(argv: list[str] | None = None) -> int:
    from loraplex.startup import quiet_bitsandbytes

    quiet_bitsandbytes()  # before anything imports bitsandbytes (loraplex/startup.py)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        result = args.func(args)
    except Exception as e:  # noqa: BLE001 — client errors become one line and a status
        import grpc

        from loraplex.server.grpc.tls import TlsError

        if isinstance(e, grpc.RpcError):
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
        if isinstance(e, TlsError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
