"""HTTP (OpenAI-compatible) versus gRPC on the same in-process server and engine, on the
bundled tiny model: p50/p99 latency of a 1-token request (sequential, one keep-alive
connection per front end) and streamed tokens per second of one long stream. Prints a
table and the HTTP/gRPC ratios; writes JSON under bench/results/. No asserts.

    .venv/bin/python bench/http_vs_grpc.py [--requests 200] [--stream-tokens 256]
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, print_table, write_json  # noqa: E402

PROMPT = "Once upon a time"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--stream-tokens", type=int, default=256)
    p.add_argument("--streams", type=int, default=3, help="long streams per front end (median tokens/s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import torch

    import loraplex
    from loraplex.client import LoraplexClient
    from loraplex.server.app import LoraplexServer, ServeConfig
    from loraplex.server.engine.config import EngineConfig

    import tempfile

    tiny = Path(loraplex.__file__).parent / "assets" / "tiny-llama"
    engine = EngineConfig(model_dir=tiny, adapter_root=Path(tempfile.mkdtemp(prefix="http-vs-grpc-")), device=args.device, max_new_tokens=max(64, args.stream_tokens),
                          cpu_threads=1 if args.device == "cpu" else None)  # fmt: skip
    server = LoraplexServer(ServeConfig(engine=engine, port=0, metrics_port=None, http_port=0))
    server.start()
    server.warm_up()
    try:
        host, port = "127.0.0.1", server.http_port
        conn = http.client.HTTPConnection(host, port, timeout=60)
        conn.connect()  # Nagle off, as gRPC has it: else a delayed ACK adds ~40 ms to each small request
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def http_one():
            conn.request("POST", "/v1/completions", json.dumps({"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 1,
                                                                "temperature": 0}), {"Content-Type": "application/json"})  # fmt: skip
            r = conn.getresponse()
            assert r.status == 200, r.read()
            r.read()

        def http_stream() -> int:
            c = http.client.HTTPConnection(host, port, timeout=120)
            c.request("POST", "/v1/completions", json.dumps({"model": "tiny-llama", "prompt": PROMPT, "max_tokens": args.stream_tokens,
                                                             "temperature": 0, "ignore_eos": True, "stream": True,
                                                             "return_token_ids": True}), {"Content-Type": "application/json"})  # fmt: skip
            r, n = c.getresponse(), 0
            for line in r:
                if line.startswith(b"data: {"):
                    n += len(json.loads(line[6:])["choices"][0].get("token_ids", []))
            c.close()
            return n

        with LoraplexClient(server.target, timeout=120) as client:
            def grpc_one():
                client.generate(PROMPT, "", max_new_tokens=1, temperature=0.0)

            def grpc_stream() -> int:
                return sum(len(c.token_ids) for c in client.generate_stream(PROMPT, "", max_new_tokens=args.stream_tokens,
                                                                             temperature=0.0, ignore_eos=True))  # fmt: skip

            rows = []
            for name, one, stream in (("gRPC", grpc_one, grpc_stream), ("HTTP", http_one, http_stream)):
                for _ in range(10):
                    one()
                lat = []
                for _ in range(args.requests):
                    t = time.perf_counter()
                    one()
                    lat.append((time.perf_counter() - t) * 1e3)
                rates = []
                for _ in range(args.streams):
                    t = time.perf_counter()
                    n = stream()
                    assert n == args.stream_tokens, n
                    rates.append(n / (time.perf_counter() - t))
                rows.append({"frontend": name, "p50_ms": statistics.median(lat), "p99_ms": pct(lat, 0.99),
                             "stream_tok_s": statistics.median(rates)})  # fmt: skip
        conn.close()
    finally:
        server.stop(2.0)

    g, h = rows
    rows.append({"frontend": "HTTP/gRPC", "p50_ms": h["p50_ms"] / g["p50_ms"], "p99_ms": h["p99_ms"] / g["p99_ms"],
                 "stream_tok_s": h["stream_tok_s"] / g["stream_tok_s"]})  # fmt: skip
    print(f"1-token latency over {args.requests} sequential requests; tokens/s: median of {args.streams} streams "
          f"of {args.stream_tokens} tokens (last row: ratios)")
    print_table(rows, [("frontend", "front end", "s"), ("p50_ms", "p50 ms", ".2f"), ("p99_ms", "p99 ms", ".2f"),
                       ("stream_tok_s", "stream tok/s", ".1f")])  # fmt: skip
    path = write_json(args.out, "http_vs_grpc", {"env": environment(torch.device(args.device)), "args": vars(args), "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
