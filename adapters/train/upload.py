"""Hands a trained adapter directory to a running loraplex server (`--upload HOST:PORT`).

The transfer itself is the client's (`loraplex.client.LoraplexClient.upload_adapter`,
streaming the UploadAdapter RPC); this module only checks the arguments, imports the
client lazily (so training works before and without the gRPC stack) and hands it the
directory, which must hold adapter_config.json and adapter_model.safetensors.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ADMIN_TOKEN_ENV = "LORAPLEX_ADMIN_TOKEN"
_TARGET = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")  # host:port, [v6]:port


def check_target(target: str) -> str:
    """Returns `target` if it reads HOST:PORT, else raises ValueError."""
    m = _TARGET.match(target or "")
    if not m or not 0 < int(m.group(2)) < 65536:
        raise ValueError(f"--upload wants HOST:PORT (e.g. localhost:50051), not {target!r}")
    return target


def upload_adapter(target: str, adapter_dir: str | Path, adapter_id: str | None = None,
                   admin_token: str | None = None, replace: bool = False, *, tls: bool = False,
                   tls_ca: str | Path | None = None, tls_cert: str | Path | None = None, tls_key: str | Path | None = None):
    """Uploads the PEFT adapter in `adapter_dir` to the server at `target` as `adapter_id`
    (default: the directory's name). The admin token defaults to $LORAPLEX_ADMIN_TOKEN.
    TLS as the client takes it: `tls_ca` (or `tls` for the system's roots), and
    `tls_cert` + `tls_key` for servers that require client certificates.
    Returns what the client returns (the server's description of the adapter)."""
    check_target(target)
    adapter_dir = Path(adapter_dir)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (adapter_dir / name).is_file():
            raise FileNotFoundError(f"{adapter_dir} has no {name}: not a trained adapter directory")
    adapter_id = adapter_id or adapter_dir.resolve().name
    token = admin_token if admin_token is not None else os.environ.get(ADMIN_TOKEN_ENV)
    if not token:
        raise ValueError(f"uploading needs the server's admin token: pass --admin-token or set ${ADMIN_TOKEN_ENV}")

    from loraplex.client import LoraplexClient  # lazy: the gRPC client is optional for training

    with LoraplexClient(target, admin_token=token, tls=tls, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key) as client:
        return client.upload_adapter(adapter_id, str(adapter_dir), replace=replace)
