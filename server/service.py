"""Front-end-neutral operations under both front ends (server/grpc/, server/http/).

    service = Service(engine, store, metrics, served_model_name="tiny-llama")
    handle = service.submit(service.request(prompt, params, adapter_id), frontend="http")
    observer = service.observer(handle)        # TTFT, inter-token latency, token counts
    info = service.load("shout", "shout")      # adapters: upload/load/unload/list/get

A front end parses its wire format into the engine's request types (which validate
themselves: engine/request.py), asks this module for everything else, and maps the
exceptions raised here (engine/errors.py, adapters/errors.py, and the three below) to its
own status codes: server/grpc/status.py, server/http/errors.py. It knows no gRPC, no HTTP
and no protobuf; nothing here imports grpc, FastAPI or uvicorn.

Access (`Access`): the token rules of both front ends. Adapters: the checks, the store
commit, the manager's registration and the rollback on failure happen here, once.
Model names: the base model is `served_model_name`; `model` may be an adapter id,
`<base>:<adapter>` or the base id (the base wins over an adapter of the same name).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

from loraplex.adapters.errors import AdapterExists
from loraplex.adapters.store import validate_id
from loraplex.server.engine.errors import EngineError, InvalidRequest, UnknownAdapter
from loraplex.server.engine.request import FinishEvent, GenerationRequest, RequestHandle, SamplingParams, TokenEvent

MAX_PAGE_SIZE = 1000  # adapters per list page (and the default)
MAX_PROMPT_CHARS = 1 << 20  # text prompts are refused before tokenizing past this
CONFIG_FILENAME = "adapter_config.json"
FRONTENDS = ("grpc", "http")


class NotReady(EngineError):
    """Starting, warming up or draining (gRPC UNAVAILABLE, HTTP 503)."""


class NotStoredByUpload(EngineError):
    """An adapter loaded from a path asked to have its files deleted (FAILED_PRECONDITION)."""


class UnknownModel(UnknownAdapter):
    """A `model` name that is neither the base nor a registered adapter (HTTP 404)."""


# -- access -------------------------------------------------------------------------------
UNAUTHENTICATED = "unauthenticated"  # gRPC UNAUTHENTICATED, HTTP 401
PERMISSION_DENIED = "permission_denied"  # gRPC PERMISSION_DENIED, HTTP 403


@dataclass(frozen=True)
class Refusal:
    kind: str  # UNAUTHENTICATED | PERMISSION_DENIED
    message: str


def _matches_any(presented: str, tokens: tuple[bytes, ...]) -> bool:
    """Constant time in which token matches: every one is compared."""
    candidate = presented.encode("utf-8", "surrogatepass")
    found = False
    for token in tokens:
        found |= hmac.compare_digest(candidate, token)
    return found


class Access:
    """Who may call what, given the presented bearer token (None: none presented).

    Admin calls: the admin token; none presented: UNAUTHENTICATED; another token (an API
    token too): PERMISSION_DENIED; no admin token configured: PERMISSION_DENIED, unless
    `insecure_admin`. Generation, once API tokens are set: one of them or the admin
    token, else UNAUTHENTICATED. Tokens are compared in constant time."""

    def __init__(self, admin_token: str | None = None, api_tokens=(), insecure_admin: bool = False):
        if admin_token is not None and not admin_token:
            raise ValueError("admin token must not be empty")
        if any(not t for t in api_tokens):
            raise ValueError("tokens must not be empty")
        self._admin = admin_token.encode() if admin_token else None
        self._insecure = insecure_admin
        accepted = set(api_tokens) | ({admin_token} if api_tokens and admin_token else set())
        self._clients = tuple(sorted(t.encode() for t in accepted))

    @property
    def clients_need_token(self) -> bool:
        return bool(self._clients)

    def admin_refusal(self, token: str | None) -> Refusal | None:
        if self._admin is None:
            if self._insecure:
                return None
            return Refusal(PERMISSION_DENIED, "admin API disabled: start the server with --admin-token or LORAPLEX_ADMIN_TOKEN")
        if token is None:
            return Refusal(UNAUTHENTICATED, "admin token required: 'authorization: Bearer <token>'")
        if not _matches_any(token, (self._admin,)):
            return Refusal(PERMISSION_DENIED, "this token may not call the admin API")
        return None

    def client_refusal(self, token: str | None) -> Refusal | None:
        if not self._clients:
            return None
        if token is None:
            return Refusal(UNAUTHENTICATED, "API token required: 'authorization: Bearer <token>'")
        if not _matches_any(token, self._clients):
            return Refusal(UNAUTHENTICATED, "invalid API token")
        return None


def bearer_token(value: str | bytes | None) -> str | None:
    """The token of an `authorization: Bearer <token>` value, else None."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


# -- latency metrics ------------------------------------------------------------------------
class Observer:
    """Sees one request's events in order; observes TTFT (from the request's arrival to
    its first token event), inter-token latency (between token events) and the token
    counts, from the engine's event times: the same for every front end."""

    def __init__(self, metrics, handle: RequestHandle):
        self._metrics = metrics
        self._arrival = handle.request.arrival
        self._last: float | None = None

    def see(self, event) -> None:
        if self._metrics is None:
            return
        if isinstance(event, FinishEvent):
            self._metrics.observe_finish(event.prompt_tokens, event.generated_tokens)
        elif isinstance(event, TokenEvent) and event.token_ids:  # not the text-only flush before the finish
            if self._last is None:
                self._metrics.ttft.observe(max(event.time - self._arrival, 0.0))
            else:
                self._metrics.itl.observe(max(event.time - self._last, 0.0))
            self._last = event.time


# -- the service ----------------------------------------------------------------------------
class Service:
    def __init__(self, engine, store, metrics=None, served_model_name: str | None = None):
        self._engine = engine
        self._store = store
        self._metrics = metrics
        self.base_model = served_model_name or Path(engine.config.model_dir).name

    @property
    def engine(self):
        return self._engine

    # generation -------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return bool(self._engine.ready)

    def check_ready(self) -> None:
        if not self.ready:
            raise NotReady("the server is not ready: starting, warming up or shutting down")

    def encode(self, text: str) -> list[int]:
        """Token ids of a text prompt; InvalidRequest when it is empty or too large."""
        if len(text) > MAX_PROMPT_CHARS:
            raise InvalidRequest(f"the prompt has {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
        ids = list(self._engine.tokenizer.encode(text)) if text else []
        if not ids:
            raise InvalidRequest("prompt is empty")
        return ids

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of `messages` rendered with the model's chat template (InvalidRequest
        when the model has none)."""
        if sum(len(m.get("content") or "") for m in messages) > MAX_PROMPT_CHARS:
            raise InvalidRequest(f"the messages are over {MAX_PROMPT_CHARS} characters")
        tokenizer = self._engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidRequest(f"the model {self.base_model!r} has no chat template (tokenizer_config.json); "
                                 "use /v1/completions")  # fmt: skip
        try:
            return tokenizer.encode_chat(messages)
        except Exception as e:  # noqa: BLE001 — a template that fails on these messages (jinja raise_exception)
            raise InvalidRequest(f"the chat template cannot render these messages: {e}") from None

    def request(
        self, prompt: str | list[int], params: SamplingParams, adapter_id: str | None = None, deadline: float | None = None,
        adapters: tuple[tuple[str, float], ...] = (),
    ) -> GenerationRequest:
        """A GenerationRequest; a text prompt is tokenized. `adapters`: a mixture, (adapter
        id, weight) per part, exclusive with adapter_id. InvalidRequest names what is wrong."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise InvalidRequest("prompt is empty")
        return GenerationRequest(prompt_token_ids=ids, params=params, adapter_id=adapter_id, adapters=tuple(adapters),
                                 deadline=deadline)  # fmt: skip

    def remaining_tokens(self, prompt_tokens: int) -> int:
        """The most tokens a request with this prompt may generate (context and server cap)."""
        return max(1, min(self._engine.config.max_new_tokens, self._engine.max_context - prompt_tokens))

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queues the request; raises NotReady, InvalidRequest, UnknownAdapter, QueueFull, EngineDraining."""
        self.check_ready()
        if self._metrics is not None and request.adapters:
            self._metrics.count_mixture_request()
        elif self._metrics is not None:
            adapter_id = request.adapter_id
            self._metrics.count_adapter_request(adapter_id, bool(adapter_id) and adapter_id in self._engine.adapters)
        return self._engine.submit(request)

    def observer(self, handle: RequestHandle) -> Observer:
        return Observer(self._metrics, handle)

    # model names (HTTP's `model`) ---------------------------------------------------------
    def adapter_for_model(self, model: str) -> str | None:
        """The adapter id `model` names (None: the base); UnknownModel otherwise. Never
        falls back to the base model."""
        if model == self.base_model:
            return None
        base, sep, adapter = model.partition(":")
        if sep and base == self.base_model:
            model = adapter
        if not model or model not in self._engine.adapters:
            shown = model if len(model) <= 64 else model[:64] + "..."
            raise UnknownModel(f"the model {shown!r} does not exist")
        return model

    def models(self) -> list[tuple[str, str | None]]:
        """(id, parent) of the base model (parent None) and of every adapter (parent: the base)."""
        return [(self.base_model, None)] + [(info.adapter_id, self.base_model) for info in self._engine.adapters.list()]

    # adapters ---------------------------------------------------------------------------
    def begin_upload(self, adapter_id: str, replace: bool = False) -> "Upload":
        """An upload into the store (AdapterExists before any file is written, unless replace)."""
        return Upload(self, adapter_id, replace)

    def load(self, adapter_id: str, path: str, replace: bool = False):
        """Registers an adapter directory under the adapter root (absolute or relative to it)."""
        validate_id(adapter_id)
        resolved = self._store.resolve_load_path(path)
        return self._engine.adapters.add(adapter_id, resolved, replace=replace)

    def unload(self, adapter_id: str, delete_files: bool = False) -> None:
        """Unregisters an adapter (requests in flight finish); `delete_files` also removes its
        stored files, only for an adapter the store holds (NotStoredByUpload otherwise)."""
        info = self._engine.adapters.get(adapter_id)
        if delete_files and Path(info.path).resolve() != self._store.path(adapter_id):
            raise NotStoredByUpload(f"adapter {adapter_id!r} was loaded from {info.path}, not stored by an upload; "
                                    "unload it without delete_files")  # fmt: skip
        self._engine.adapters.remove(adapter_id)
        if self._metrics is not None:
            self._metrics.forget_adapter(adapter_id)
        if delete_files:
            self._store.delete(adapter_id)

    def list_page(self, page_token: str = "", page_size: int = 0):
        """(infos, next page token); page_size 0 = MAX_PAGE_SIZE."""
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            raise InvalidRequest(f"page_size {page_size} is over the limit {MAX_PAGE_SIZE}")
        return self._engine.adapters.list_page(page_token, page_size or MAX_PAGE_SIZE)

    def get(self, adapter_id: str):
        return self._engine.adapters.get(adapter_id)


class Upload:
    """Files of one adapter streaming into a staging directory of the store. commit()
    validates them (converting them, before anything on disk is replaced), moves them into
    place and registers the converted weights; if registering fails, a new adapter's files
    are removed again. abort() (or leaving a `with` block by an exception) keeps nothing."""

    def __init__(self, service: Service, adapter_id: str, replace: bool):
        engine = service._engine
        if not replace and adapter_id in engine.adapters:
            raise AdapterExists(f"adapter {adapter_id!r} already exists")
        self._service = service
        self.adapter_id = adapter_id
        self.replace = replace
        self._writer = service._store.begin_upload(adapter_id)  # validates the id

    def write(self, filename: str, data: bytes) -> None:
        self._writer.write(filename, data)

    def commit(self):
        engine, store = self._service._engine, self._service._store
        converted = []  # the validation's result, registered as it is
        path = self._writer.commit(lambda d: converted.append(engine.adapters.convert(d)), replace=self.replace)
        self._writer = None
        try:
            return engine.adapters.add(self.adapter_id, path, replace=self.replace, weights=converted[0])
        except Exception:
            if not self.replace:  # stored but not registered: do not leave it behind
                store.delete(self.adapter_id)
            raise

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    def __enter__(self) -> "Upload":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
