"""`loraplex serve` as a process: SIGTERM drains (health NOT_SERVING, new requests
UNAVAILABLE, the request in flight finishes) and exits 0; an adapter uploaded to one
process is served by the next one on the same adapter root."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from loraplex.client import LoraplexClient

TOKEN = "process-admin-token"
PROMPT = "Once upon a time"


class ServeProcess:
    def __init__(self, tmp: Path, root: Path, name: str):
        env = dict(os.environ, LORAPLEX_ADMIN_TOKEN=TOKEN, XDG_DATA_HOME=str(tmp / "xdg"))
        self.log = tmp / f"{name}.log"
        cmd = [sys.executable, "-m", "loraplex.server.cli", "serve", "--port", "0", "--metrics-port", "0",
               "--adapter-root", str(root), "--no-demo-adapters", "--max-running", "2", "--max-queue", "4",
               "--kv-cache-tokens", "2048", "--max-batch-tokens", "256", "--adapter-slots", "2", "--max-rank", "8",
               "--shutdown-grace", "30", "--http-port", "0"]  # fmt: skip
        # cwd outside the repository: `python -m` puts the cwd on sys.path
        self.proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=self.log.open("w"), text=True)
        self.target = None
        deadline = time.monotonic() + 90
        for line in self.proc.stdout:
            match = re.search(r"serving on (\S+)", line)
            if match:
                self.target = match.group(1)
                break
            assert time.monotonic() < deadline
        assert self.target, f"no 'serving on' line; log:\n{self.log.read_text()}"

    def stop(self, sig=signal.SIGTERM, timeout: float = 60.0) -> int:
        """Sends `sig` (None: it was sent already; a second signal exits at once) and waits."""
        if sig is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture
def processes():
    started = []
    yield started
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait(10)


def test_sigterm_drains_and_adapters_survive_restart(tmp_path, make_lora, processes):
    root = tmp_path / "adapters"
    first = ServeProcess(tmp_path, root, "first")
    processes.append(first)
    with LoraplexClient(first.target, admin_token=TOKEN, timeout=30) as client:
        assert client.health() == "SERVING"
        client.upload_adapter("kept", make_lora(rank=4, seed=31))
        expected = client.generate(PROMPT, "kept", max_new_tokens=8, ignore_eos=True).token_ids

        stream = client.generate_stream(PROMPT, max_new_tokens=400, ignore_eos=True)
        chunks = iter(stream)
        received = len(next(chunks).token_ids)
        first.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while client.health() != "NOT_SERVING":
            assert time.monotonic() < deadline, "health never turned NOT_SERVING"
            time.sleep(0.02)
        with pytest.raises(grpc.RpcError) as e:
            client.generate(PROMPT, max_new_tokens=2)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        rest = list(chunks)  # the request in flight finishes
        assert rest[-1].finish_reason == "length" and received + sum(len(c.token_ids) for c in rest) == 400
    assert first.stop(None) == 0
    assert (root / "kept" / "adapter_model.safetensors").is_file()

    second = ServeProcess(tmp_path, root, "second")
    processes.append(second)
    with LoraplexClient(second.target, admin_token=TOKEN, timeout=30) as client:
        assert [a.adapter_id for a in client.list_adapters()] == ["kept"]
        assert client.generate(PROMPT, "kept", max_new_tokens=8, ignore_eos=True).token_ids == expected
    assert second.stop(signal.SIGINT) == 0
