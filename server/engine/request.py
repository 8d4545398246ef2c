"""What a caller hands the engine and what it gets back. No gRPC, no HTTP, no tensors.

The request types carry the limits every front end shares, checked on construction
(InvalidRequest, a ValueError, names the field): sampling ranges, stop strings and stop
token ids, the adapter-id pattern. What depends on the loaded model (prompt length,
vocabulary, context) the engine checks at submit. Messages quote at most a short prefix
of what the client sent.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from loraplex.adapters.errors import AdapterError
from loraplex.adapters.mixture import check_parts
from loraplex.adapters.store import ID_PATTERN
from loraplex.server.engine.errors import InvalidRequest

FINISH_LENGTH = "length"  # max_new_tokens reached
FINISH_STOP = "stop"  # a stop token id, stop string or EOS
FINISH_CANCELLED = "cancelled"
FINISH_DEADLINE = "deadline"
FINISH_ERROR = "error"
FINISH_ADAPTER_GONE = "adapter_removed"  # its adapter was unloaded before the request started

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64  # the engine checks each generated token against all of them
# Sampling divides float32 logits by the temperature: near float32's smallest values (and
# below, where it rounds to 0) the quotient overflows and the request's row would fail.
# Anything this small is greedy in all but name.
MIN_TEMPERATURE = 1e-4

_ids = itertools.count(1)


def _shown(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings, validated on construction (InvalidRequest names the field)."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # None = nondeterministic sampling
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not 1 <= self.max_new_tokens <= 1_000_000:
            raise InvalidRequest(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and (self.temperature == 0.0 or MIN_TEMPERATURE <= self.temperature <= 100.0)):
            raise InvalidRequest(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, 100], got {self.temperature}")
        if not 0 <= self.top_k <= 1_000_000:
            raise InvalidRequest(f"top_k must be ≥ 0, got {self.top_k}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequest(f"seed must be in [0, 2^63), got {self.seed}")
        if len(self.stop_strings) > MAX_STOP_STRINGS:
            raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop_strings)}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise InvalidRequest("stop strings must be non-empty strings")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in self.stop_strings):
            raise InvalidRequest(f"stop strings are at most {MAX_STOP_STRING_CHARS} characters")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequest(f"at most {MAX_STOP_TOKEN_IDS} stop token ids, got {len(self.stop_token_ids)}")
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidRequest("stop token ids must be ≥ 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass(frozen=True)
class TokenEvent:
    """New tokens of one request, and the text they complete (may be empty mid-character)."""

    token_ids: tuple[int, ...]
    text: str
    time: float  # time.monotonic() when produced


@dataclass(frozen=True)
class FinishEvent:
    """The last event of every request, whatever happened."""

    finish_reason: str  # FINISH_*
    token_ids: tuple[int, ...]  # all generated tokens (stop string excluded from text, not from ids)
    text: str
    prompt_tokens: int
    error: str | None = None  # set when finish_reason is FINISH_ERROR or FINISH_ADAPTER_GONE
    time: float = field(default_factory=time.monotonic)

    @property
    def generated_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class GenerationRequest:
    """A request as submitted. `adapter_id` None or "" = base model. `adapters`: a
    mixture, (adapter id, weight) per part (adapters/mixture.py), exclusive with adapter_id."""

    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter_id: str | None = None
    adapters: tuple[tuple[str, float], ...] = ()  # a mixture: Σ weight · ΔW(adapter id)
    deadline: float | None = None  # time.monotonic() after which the request ends with FINISH_DEADLINE
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    arrival: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        """Front-end-neutral checks; whether the adapter is registered and the prompt fits
        the model are the engine's questions (at submit)."""
        if not self.adapter_id:
            self.adapter_id = None
        else:
            _check_id(self.adapter_id)
        self.adapters = tuple((i, w) for i, w in self.adapters)
        if self.adapters:
            if self.adapter_id is not None:
                raise InvalidRequest("adapter_id and adapters are exclusive: name one adapter, or a mixture of several")
            for i, _ in self.adapters:
                _check_id(i)
            try:
                check_parts(self.adapters)
            except AdapterError as e:
                raise InvalidRequest(str(e)) from None


def _check_id(adapter_id: str) -> None:
    if not ID_PATTERN.fullmatch(adapter_id) or ".." in adapter_id:
        raise InvalidRequest(f"adapter id {_shown(adapter_id)!r} is malformed: 1-128 letters, digits, '.', '_', '-', "
                             "starting with a letter or digit, without '..'")  # fmt: skip


class RequestHandle:
    """The caller's side of a submitted request: a stream of events ending with one
    FinishEvent, and cancellation. Thread-safe; the engine thread is the producer."""

    def __init__(self, request: GenerationRequest):
        self.request = request
        self._events: queue.Queue = queue.Queue()
        self._cancelled = threading.Event()
        self._listener: Callable[[], None] | None = None
        self.finished: FinishEvent | None = None

    # engine side
    def _emit(self, event) -> None:
        if isinstance(event, FinishEvent):
            self.finished = event
        self._events.put(event)
        listener = self._listener
        if listener is not None:
            try:
                listener()
            except Exception:  # noqa: BLE001 — a listener's failure must not fail the engine step
                pass

    # caller side
    def cancel(self) -> None:
        """Asks the engine to end the request; its FinishEvent says "cancelled"."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def set_listener(self, listener: Callable[[], None] | None) -> None:
        """listener() runs in the engine's thread after each event is queued (an asyncio
        front end wakes its loop with it); it must be quick and must not block."""
        self._listener = listener
        if listener is not None and not self._events.empty():
            listener()

    def next_event(self):
        """The next queued event, or None if there is none yet (never blocks)."""
        try:
            return self._events.get_nowait()
        except queue.Empty:
            return None

    def events(self, timeout: float | None = None):
        """Yields TokenEvents then the FinishEvent. `timeout` bounds each wait (TimeoutError)."""
        while True:
            try:
                event = self._events.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no event for {self.request.request_id} within {timeout}s") from None
            yield event
            if isinstance(event, FinishEvent):
                return

    def result(self, timeout: float | None = None) -> FinishEvent:
        """Blocks until the request finishes."""
        for event in self.events(timeout):
            if isinstance(event, FinishEvent):
                return event
        raise AssertionError("unreachable")
