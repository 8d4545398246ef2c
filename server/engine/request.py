"""What a caller hands the engine and what it gets back. No gRPC, no tensors."""

from __future__ import annotations

import itertools
import math
import queue
import threading
import time
from dataclasses import dataclass, field

FINISH_LENGTH = "length"  # max_new_tokens reached
FINISH_STOP = "stop"  # a stop token id, stop string or EOS
FINISH_CANCELLED = "cancelled"
FINISH_DEADLINE = "deadline"
FINISH_ERROR = "error"
FINISH_ADAPTER_GONE = "adapter_removed"  # its adapter was unloaded before the request started

_ids = itertools.count(1)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings, validated on construction (ValueError names the field)."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # None = nondeterministic sampling
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= 1_000_000:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and (self.temperature == 0.0 or 1e-4 <= self.temperature <= 100.0)):
            raise ValueError(f"temperature must be 0 (greedy) or in [1e-4, 100], got {self.temperature}")
        if not 0 <= self.top_k <= 1_000_000:
            raise ValueError(f"top_k must be ≥ 0, got {self.top_k}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2^63), got {self.seed}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError("stop strings must be non-empty strings")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError("stop token ids must be ≥ 0")

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
    """A request as submitted. `adapter_id` None or "" = base model."""

    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter_id: str | None = None
    deadline: float | None = None  # time.monotonic() after which the request ends with FINISH_DEADLINE
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    arrival: float = field(default_factory=time.monotonic)


class RequestHandle:
    """The caller's side of a submitted request: a stream of events ending with one
    FinishEvent, and cancellation. Thread-safe; the engine thread is the producer."""

    def __init__(self, request: GenerationRequest):
        self.request = request
        self._events: queue.Queue = queue.Queue()
        self._cancelled = threading.Event()
        self.finished: FinishEvent | None = None

    # engine side
    def _emit(self, event) -> None:
        if isinstance(event, FinishEvent):
            self.finished = event
        self._events.put(event)

    # caller side
    def cancel(self) -> None:
        """Asks the engine to end the request; its FinishEvent says "cancelled"."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

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
