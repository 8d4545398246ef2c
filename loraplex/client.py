"""A small Python client for a loraplex server (used by the CLI and the tests).

    with LoraplexClient("127.0.0.1:50051", admin_token="...") as client:
        client.wait_ready()
        print(client.generate("Once upon a time", adapter_id="poet", max_new_tokens=32).text)
        for chunk in client.generate_stream("Hello", max_new_tokens=16):
            print(chunk.text, end="", flush=True)
        client.upload_adapter("mine", "path/to/peft_adapter_dir")

Access: `admin_token` goes with admin calls; `api_token` (or, without one, the admin
token) with generation calls, for servers started with --api-token. TLS: `tls_ca` (the
CA to trust; `tls=True` alone trusts the system's roots) and, for servers that require
client certificates, `tls_cert` + `tls_key`.

Errors are grpc.RpcError; `.code()` is the gRPC status (NOT_FOUND for an unknown
adapter, RESOURCE_EXHAUSTED when the server's queue is full, ...). This module imports
only grpc, the generated stubs and loraplex.server.grpc.tls (grpc only) — no torch.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.server.grpc.tls import channel_credentials
from loraplex.v1 import admin_pb2, admin_pb2_grpc, generate_pb2, generate_pb2_grpc

DEFAULT_CHUNK_SIZE = 1 << 20  # well under gRPC's default 4 MiB message limit
# The files of a PEFT adapter directory that are uploaded (the server accepts only
# these); others (README.md, checkpoints, .bin pickles) stay behind.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

_FINISH_NAMES = {
    generate_pb2.FINISH_REASON_LENGTH: "length",
    generate_pb2.FINISH_REASON_STOP: "stop",
    generate_pb2.FINISH_REASON_CANCELLED: "cancelled",
    generate_pb2.FINISH_REASON_DEADLINE: "deadline",
    generate_pb2.FINISH_REASON_ERROR: "error",
}


@dataclass(frozen=True)
class GenerateResult:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # length | stop | cancelled | deadline | error
    prompt_tokens: int
    generated_tokens: int
    request_id: str


@dataclass(frozen=True)
class StreamChunk:
    text: str  # text completed by these tokens (may be empty)
    token_ids: tuple[int, ...]
    finish_reason: str | None  # set on the last chunk only
    prompt_tokens: int  # 0 until the last chunk
    generated_tokens: int  # 0 until the last chunk
    request_id: str


@dataclass(frozen=True)
class AdapterDetails:
    adapter_id: str
    adapter_type: str
    ranks: dict[str, list[int]]  # module name -> rank per layer
    target_modules: list[str]
    size_bytes: int
    resident: bool
    path: str
    host_cached: bool = False


class GenerationStream:
    """Iterates StreamChunks; cancel() (or leaving a `with` block early) ends the request."""

    def __init__(self, call):
        self._call = call

    def __iter__(self) -> Iterator[StreamChunk]:
        for message in self._call:
            yield _chunk(message)

    def cancel(self) -> None:
        self._call.cancel()

    def __enter__(self) -> "GenerationStream":
        return self

    def __exit__(self, *exc) -> None:
        self._call.cancel()


class LoraplexClient:
    def __init__(
        self,
        target: str,
        admin_token: str | None = None,
        timeout: float | None = 60.0,
        options=(),
        *,
        api_token: str | None = None,
        tls: bool = False,
        tls_ca: str | os.PathLike | None = None,
        tls_cert: str | os.PathLike | None = None,
        tls_key: str | os.PathLike | None = None,
    ):
        self.target = target
        self.timeout = timeout
        self._admin_metadata = _bearer(admin_token)
        self._gen_metadata = _bearer(api_token or admin_token)
        if tls or tls_ca is not None or tls_cert is not None or tls_key is not None:
            credentials = channel_credentials(tls_ca, tls_cert, tls_key)
            self._channel = grpc.secure_channel(target, credentials, options=list(options))
        else:
            self._channel = grpc.insecure_channel(target, options=list(options))
        self._gen = generate_pb2_grpc.GenerationStub(self._channel)
        self._admin = admin_pb2_grpc.AdapterAdminStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # -- generation -------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[int], adapter_id: str = "", *, timeout: float | None = ..., **params) -> GenerateResult:
        """`prompt`: text, or token ids. `params`: max_new_tokens, temperature, top_k, top_p,
        seed, stop, stop_token_ids, ignore_eos (see SamplingParameters in generate.proto), and
        adapters={id: weight} for a per-request mixture instead of adapter_id."""
        request = build_request(prompt, adapter_id, **params)
        response = self._gen.Generate(request, timeout=self._timeout(timeout), metadata=self._gen_metadata)
        return GenerateResult(
            text=response.text,
            token_ids=tuple(response.token_ids),
            finish_reason=_FINISH_NAMES.get(response.finish_reason, "unspecified"),
            prompt_tokens=response.usage.prompt_tokens,
            generated_tokens=response.usage.generated_tokens,
            request_id=response.request_id,
        )

    def generate_stream(self, prompt: str | Sequence[int], adapter_id: str = "", *, timeout: float | None = ..., **params) -> GenerationStream:
        request = build_request(prompt, adapter_id, **params)
        call = self._gen.GenerateStream(request, timeout=self._timeout(timeout), metadata=self._gen_metadata)
        return GenerationStream(call)

    # -- adapters (admin) -------------------------------------------------------------------
    def upload_adapter(
        self,
        adapter_id: str,
        adapter_dir: str | os.PathLike,
        replace: bool = False,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        timeout: float | None = None,
    ) -> AdapterDetails:
        """Streams adapter_config.json and adapter_model.safetensors in chunks."""
        adapter_dir = Path(adapter_dir)
        if chunk_size <= 0:
            raise ValueError("chunk_size must be > 0")
        files = [adapter_dir / name for name in ADAPTER_FILES]
        for path in files:
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing (an adapter directory holds {' and '.join(ADAPTER_FILES)})")

        def messages():
            yield admin_pb2.UploadAdapterRequest(header=admin_pb2.UploadHeader(adapter_id=adapter_id, replace=replace))
            for path in files:
                with path.open("rb") as f:
                    sent = False
                    while True:
                        data = f.read(chunk_size)
                        if not data and sent:
                            break
                        yield admin_pb2.UploadAdapterRequest(chunk=admin_pb2.FileChunk(filename=path.name, data=data))
                        sent = True
                        if not data:
                            break

        info = self._admin.UploadAdapter(messages(), timeout=timeout, metadata=self._admin_metadata)
        return _details(info)

    def load_adapter(self, adapter_id: str, path: str, replace: bool = False) -> AdapterDetails:
        request = admin_pb2.LoadAdapterRequest(adapter_id=adapter_id, path=str(path), replace=replace)
        return _details(self._admin.LoadAdapter(request, timeout=self.timeout, metadata=self._admin_metadata))

    def unload_adapter(self, adapter_id: str, delete_files: bool = False) -> None:
        request = admin_pb2.UnloadAdapterRequest(adapter_id=adapter_id, delete_files=delete_files)
        self._admin.UnloadAdapter(request, timeout=self.timeout, metadata=self._admin_metadata)

    def list_adapters(self, page_size: int = 0) -> list[AdapterDetails]:
        """Every adapter, fetched page by page (page_size 0: the server's default)."""
        out, token = [], ""
        while True:
            request = admin_pb2.ListAdaptersRequest(page_size=page_size, page_token=token)
            response = self._admin.ListAdapters(request, timeout=self.timeout, metadata=self._admin_metadata)
            out += [_details(a) for a in response.adapters]
            token = response.next_page_token
            if not token:
                return out

    def get_adapter(self, adapter_id: str) -> AdapterDetails:
        request = admin_pb2.GetAdapterRequest(adapter_id=adapter_id)
        return _details(self._admin.GetAdapter(request, timeout=self.timeout, metadata=self._admin_metadata))

    # -- health -----------------------------------------------------------------------------
    def health(self, service: str = "") -> str:
        """SERVING, NOT_SERVING, ... (grpc.health.v1)."""
        response = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_ready(self, timeout: float = 60.0, service: str = "") -> None:
        """Blocks until the server reports SERVING (TimeoutError after `timeout` s)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health(service) == "SERVING":
                    return
            except grpc.RpcError as e:
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.target} not SERVING within {timeout}s")
            time.sleep(0.1)

    # -- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "LoraplexClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _timeout(self, timeout):
        return self.timeout if timeout is ... else timeout


def _bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def build_request(
    prompt: str | Sequence[int],
    adapter_id: str = "",
    *,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    adapters: Mapping[str, float] | None = None,
) -> generate_pb2.GenerateRequest:
    """adapters: a per-request mixture {adapter id: weight} (instead of adapter_id)."""
    params = generate_pb2.SamplingParameters(
        temperature=temperature, top_k=top_k, stop=list(stop), stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos
    )
    if max_new_tokens is not None:
        params.max_new_tokens = max_new_tokens
    if top_p is not None:
        params.top_p = top_p
    if seed is not None:
        params.seed = seed
    request = generate_pb2.GenerateRequest(adapter_id=adapter_id or "", params=params)
    for part, weight in (adapters or {}).items():
        request.adapters.add(adapter_id=part, weight=weight)
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(int(t) for t in prompt)
    return request


def _chunk(message: generate_pb2.GenerateStreamResponse) -> StreamChunk:
    return StreamChunk(
        text=message.text,
        token_ids=tuple(message.token_ids),
        finish_reason=_FINISH_NAMES.get(message.finish_reason),
        prompt_tokens=message.usage.prompt_tokens,
        generated_tokens=message.usage.generated_tokens,
        request_id=message.request_id,
    )


def _details(info: admin_pb2.AdapterInfo) -> AdapterDetails:
    return AdapterDetails(
        adapter_id=info.adapter_id,
        adapter_type=info.adapter_type,
        ranks={name: list(r.ranks) for name, r in info.ranks.items()},
        target_modules=list(info.target_modules),
        size_bytes=info.size_bytes,
        resident=info.resident,
        path=info.path,
        host_cached=info.host_cached,
    )
