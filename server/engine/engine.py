"""The engine: takes requests from any thread, runs the continuous-batching step loop
in its own thread, streams each request's tokens back through its handle.

    engine = Engine.from_config(EngineConfig(model_dir=...)); engine.start(); engine.warmup()
    handle = engine.submit(GenerationRequest(prompt_token_ids=..., adapter_id="shout"))
    for event in handle.events(): ...

It knows nothing about gRPC or metrics libraries: `stats()` reports counters and gauges.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.adapters.errors import AdapterError
from loraplex.server.engine.adapter_manager import AdapterManager, describe
from loraplex.server.engine.block_manager import BlockManager
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.errors import EngineDraining, InvalidRequest, QueueFull
from loraplex.server.engine.in_flight import IdTransfer, LaunchedStep
from loraplex.server.engine.request import (
    FINISH_ADAPTER_GONE,
    FINISH_CANCELLED,
    FINISH_DEADLINE,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    FinishEvent,
    GenerationRequest,
    RequestHandle,
    SamplingParams,
    TokenEvent,
)
from loraplex.server.engine.runner import ModelRunner
from loraplex.server.engine.sampler import SAMPLING_FAILED_ERROR, SamplerInputs, request_seed, sample_step
from loraplex.server.engine.scheduler import Scheduled, Scheduler, SchedulerConfig
from loraplex.server.engine.sequence import Sequence
from loraplex.server.engine.threads import engine_cpu_threads, in_passing_thread
from loraplex.server.engine.tokenizer import Tokenizer
from loraplex.server.model.loader import LoadSpec, load_model
from loraplex.server.model.ops import model_ops
from loraplex.server.model.quantize import QuantSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    queue_depth: int
    max_queue: int
    running: int
    kv_blocks_used: int
    kv_blocks_total: int
    adapters_known: int
    adapters_resident: int
    adapters_host_cached: int  # staged in the host cache
    adapter_pins: int
    adapter_pages_used: int  # rank pages held by resident adapters, all target modules
    adapter_pages_total: int
    adapter_loads: int  # cumulative
    adapter_evictions: int  # cumulative
    adapter_load_failures: int  # cumulative
    preemptions: int  # cumulative
    steps: int  # cumulative
    cuda_graph_buckets: int = 0  # decode buckets captured (0: eager)
    cuda_graph_capture_seconds: float = 0.0
    cuda_graph_bytes: int = 0  # device memory of the graphs' pool
    cuda_graph_replays: int = 0  # cumulative decode steps run by replay


def use_device(device: torch.device) -> None:
    """Makes `device` the calling thread's current CUDA device, so that its kernels, streams
    and events are the model's. "cuda" without an index is left alone: on a new thread that
    is device 0, where the loader put the model unless its own thread had chosen another
    (torch.cuda.set_device refuses a device without an index)."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


class Engine:
    def __init__(self, config: EngineConfig, model, tokenizer: Tokenizer):
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.blocks = BlockManager(config.num_blocks, config.block_size)
        self.adapters = AdapterManager(model, config)
        self.scheduler = Scheduler(SchedulerConfig(config.max_batch_tokens, config.max_running), self.blocks, self.adapters)
        self.max_context = min(model.config.max_position, config.kv_cache_tokens)
        ops = model_ops(model.device, config.lora_backend, config.kernel_backend)
        graphs = config.cuda_graphs and model.device.type == "cuda"
        self.runner = ModelRunner(model, self.blocks, ops, config.max_batch_tokens, config.max_running, self.adapters.num_slots,
                                  self.max_context, cuda_graphs=graphs)  # fmt: skip
        self.sampler_inputs = SamplerInputs(config.max_running, model.device)  # per-row sampling parameters, refilled each step
        self.id_transfer = IdTransfer(config.max_running, model.device)
        # launch step N+1 before reading step N's ids (EngineConfig.overlap_steps)
        self.overlap = config.overlap_steps == "on" or (config.overlap_steps == "auto" and model.device.type == "cuda")
        self._in_flight: LaunchedStep | None = None  # launched, its tokens not yet streamed
        self.max_prompt = min(config.max_prompt_tokens or self.max_context, self.max_context)
        self.eos_ids = set(model.config.eos_token_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
        self.ready = False
        self.steps = 0
        self._incoming: list[Sequence] = []
        self._waiting_count = 0  # submitted, not yet admitted (incoming + scheduler.waiting)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._draining = False
        self._stop = False
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, config: EngineConfig) -> "Engine":
        if config.torch_device.type == "cpu":  # the build's OpenMP team must not outlive it (threads.py)
            return in_passing_thread(cls._build, config)
        return cls._build(config)

    @classmethod
    def _build(cls, config: EngineConfig) -> "Engine":
        spec = LoadSpec(QuantSpec(mode=config.quantize), config.torch_dtype, str(config.torch_device), nf4_backend=config.nf4_backend)
        model = load_model(config.model_dir, spec)
        engine = cls(config, model, Tokenizer(config.model_dir))
        if config.adapter_root is not None:
            engine.register_adapter_root(config.adapter_root)
        return engine

    def register_adapter_root(self, root: Path) -> None:
        """Registers every adapter directory under `root` from its config (fast: their
        weights are validated in the background); logs and skips invalid ones."""
        root.mkdir(parents=True, exist_ok=True)
        # symlinked directories are skipped: they may point outside the root (LoadAdapter refuses those too)
        for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and (p / "adapter_config.json").exists()):
            try:
                self.adapters.register(d.name, d)
            except Exception as e:  # one broken adapter must not stop the server
                log.warning("skipping adapter %s: %s", d.name, e)

    # -- the caller's side ---------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queues a request; raises InvalidRequest, UnknownAdapter, QueueFull or EngineDraining."""
        key = self._validate(request)
        handle = RequestHandle(request)
        seq = Sequence(handle, key, list(request.prompt_token_ids), len(request.prompt_token_ids), request_seed(request.params))
        with self._lock:
            if self._draining or self._stop:
                raise EngineDraining("the server is shutting down")
            if self._waiting_count >= self.config.max_queue:
                raise QueueFull(f"the queue is full ({self.config.max_queue} waiting requests)")
            self._waiting_count += 1
            self._incoming.append(seq)
            self._wake.notify()
        return handle

    def _validate(self, request: GenerationRequest):
        """The request's adapter key (None: the base model), once the request is valid."""
        ids, p = request.prompt_token_ids, request.params
        if not isinstance(p, SamplingParams):
            raise InvalidRequest("params must be SamplingParams")
        if not ids:
            raise InvalidRequest("the prompt is empty")
        if len(ids) > self.max_prompt:
            raise InvalidRequest(f"the prompt has {len(ids)} tokens; the limit is {self.max_prompt}")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab})")
        if p.max_new_tokens > self.config.max_new_tokens:
            raise InvalidRequest(f"max_new_tokens {p.max_new_tokens} is over the limit {self.config.max_new_tokens}")
        if len(ids) + p.max_new_tokens > self.max_context:
            raise InvalidRequest(f"prompt ({len(ids)}) + max_new_tokens ({p.max_new_tokens}) exceed the context of {self.max_context} tokens")
        if request.adapters:
            try:
                return self.adapters.mixture_key(request.adapters)  # UnknownAdapter for an unknown part
            except AdapterError as e:
                raise InvalidRequest(str(e)) from None
        return self.adapters.key_of(request.adapter_id) if request.adapter_id else None

    def generate(self, request: GenerationRequest, timeout: float | None = None) -> FinishEvent:
        return self.submit(request).result(timeout)

    def stats(self) -> EngineStats:
        a = self.adapters
        free = a.pages.pages_free()  # [modules]
        return EngineStats(
            queue_depth=self._waiting_count,
            max_queue=self.config.max_queue,
            running=len(self.scheduler.running),
            kv_blocks_used=self.blocks.num_used,
            kv_blocks_total=self.blocks.num_blocks,
            adapters_known=len(a),
            adapters_resident=len(a.device.resident),
            adapters_host_cached=len(a.host),
            adapter_pins=a.device.total_pins,
            adapter_pages_used=a.pages.num_pages * len(free) - sum(free),
            adapter_pages_total=a.pages.num_pages * len(free),
            adapter_loads=a.device.counters.loads,
            adapter_evictions=a.device.counters.evictions,
            adapter_load_failures=a.load_failures + a.device.counters.write_failures,
            preemptions=self.scheduler.preemptions,
            steps=self.steps,
            **self._graph_stats(),
        )

    def _graph_stats(self) -> dict:
        graphs = self.runner.graphs
        if graphs is None or graphs.stats is None:
            return {}
        s = graphs.stats
        return dict(cuda_graph_buckets=s.buckets, cuda_graph_capture_seconds=s.seconds, cuda_graph_bytes=s.bytes,
                    cuda_graph_replays=graphs.replays)  # fmt: skip

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
            self._thread.start()

    def warmup(self, timeout: float = 300.0) -> None:
        """Runs one short generation through every layer; then `ready` is True."""
        ids = self.tokenizer.encode("warm up") or [0]
        result = self.generate(GenerationRequest(ids, SamplingParams(max_new_tokens=2, ignore_eos=True)), timeout)
        if result.finish_reason == FINISH_ERROR:
            raise RuntimeError(f"warm-up failed: {result.error}")
        self.ready = True

    def drain(self) -> None:
        """Refuses new requests from now on; running and queued ones go on."""
        with self._lock:
            self._draining = True
        self.ready = False

    def idle(self) -> bool:
        with self._lock:
            return self._waiting_count == 0 and not self.scheduler.running

    def shutdown(self, grace_s: float = 10.0) -> None:
        """Drains, waits up to grace_s for requests to finish, cancels the rest, stops."""
        self.drain()
        deadline = time.monotonic() + grace_s
        while not self.idle() and time.monotonic() < deadline and self._thread is not None:
            time.sleep(0.01)
        with self._lock:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self._finish_all(FINISH_CANCELLED, None)
        self.adapters.close()

    # -- the engine thread ---------------------------------------------------------------
    def _loop(self) -> None:
        use_device(self.model.device)
        if self.model.device.type == "cpu":  # for this thread: OpenMP counts per calling thread (threads.py)
            torch.set_num_threads(engine_cpu_threads(self.config.cpu_threads))
            log.info("engine thread: %d torch threads on the CPU (--cpu-threads)", torch.get_num_threads())
        try:
            self.runner.capture()  # CUDA graphs of the decode buckets, before the first request
        except Exception:  # serving eagerly beats not serving
            log.exception("capturing CUDA graphs failed; decode steps run eagerly")
            self.runner.graphs = None
        while True:
            with self._lock:
                while not self._stop and not self._incoming and not self._has_work():
                    self._wake.wait(timeout=0.05)
                if self._stop:
                    return
                incoming, self._incoming = self._incoming, []
            self.scheduler.waiting.extend(incoming)
            self.adapters.collect()
            try:
                self.step()
            except Exception as e:  # a failed step fails its requests, not the server
                log.exception("engine step failed")
                self._in_flight = None
                self._finish_all(FINISH_ERROR, f"internal error in the engine step: {e}")

    def _has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running or self._in_flight or self.adapters.has_retired())

    def step(self) -> None:
        """One scheduling step: expire, schedule, launch the forward and sampling, then
        stream the tokens of the step launched before (overlapped) or of this one."""
        self._expire()
        plan = self.scheduler.schedule()
        for seq in self.scheduler.adapter_gone:
            self._finish(seq, FINISH_ADAPTER_GONE, f"adapter {describe(seq.adapter_key)} was unloaded before the request started")
        self.scheduler.adapter_gone.clear()
        self._count_admitted()
        previous, self._in_flight = self._in_flight, None
        if not plan:
            if previous is not None:
                self._land(previous)
            elif self.scheduler.waiting:
                time.sleep(0.002)  # adapters loading in the background, or every slot pinned
            return
        self.adapters.join_loads()
        launched = self._launch(plan, previous)
        if previous is not None:
            self._land(previous)  # while the device runs `launched`
        if launched is None:
            return
        if self.overlap:
            self._in_flight = launched
        else:
            self._land(launched)

    def _launch(self, plan: list[Scheduled], previous: LaunchedStep | None) -> LaunchedStep | None:
        """Queues the plan's forward and the sampling of its logits rows; their ids start
        towards the host. None: no row wanted logits (prefill chunks only)."""
        logits = self.runner.run(plan, carry_from=previous.chosen if previous is not None else None)
        self.steps += 1
        wanting = [item.seq for item in plan if item.wants_logits]
        for item in plan:
            item.seq.num_computed += item.num_tokens
        if not wanting:
            return None
        # position = index of the token being sampled: the same draws after preemption and recompute
        positions = [s.num_tokens for s in wanting]
        chosen = sample_step(logits, [s.params for s in wanting], [s.seed for s in wanting], positions, inputs=self.sampler_inputs)
        for row, seq in enumerate(wanting):
            seq.in_flight += 1
            seq.in_flight_row = row
        return self.id_transfer.launch(wanting, chosen)

    def _land(self, step: LaunchedStep) -> None:
        """Waits for the ids copied since the launch (the step's one device→host transfer),
        then streams them."""
        tokens = step.token_ids()
        now = time.monotonic()
        for seq, token in zip(step.seqs, tokens):
            if seq.done:  # finished meanwhile (a stop or an error in the step before): the row is dropped
                continue
            seq.in_flight -= 1
            if token < 0:  # SAMPLING_FAILED: this row only
                log.warning("sampling failed for %s: the logits are not finite", seq.seq_id)
                self._finish(seq, FINISH_ERROR, SAMPLING_FAILED_ERROR)
            else:
                self._append(seq, token, now)
            if not seq.done and seq.ending is not None:
                self._finish(seq, seq.ending)

    def _append(self, seq: Sequence, token: int, now: float) -> None:
        seq.tokens.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = now
        p = seq.params
        delta, hit_stop = seq.update_text(self.tokenizer.decode)
        if delta or not hit_stop:
            seq.handle._emit(TokenEvent((token,), delta, now))
        if hit_stop or token in p.stop_token_ids or (token in self.eos_ids and not p.ignore_eos):
            self._finish(seq, FINISH_STOP)
        elif len(seq.generated) >= p.max_new_tokens:
            self._finish(seq, FINISH_LENGTH)

    def _expire(self) -> None:
        """Ends cancelled and late requests. One with a token in flight gets it first (it
        runs no more steps; `_land` ends it), as sync steps would have streamed it."""
        now = time.monotonic()
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            reason = None
            if seq.handle.cancelled:
                reason = FINISH_CANCELLED
            elif seq.handle.request.deadline is not None and now > seq.handle.request.deadline:
                reason = FINISH_DEADLINE
            if reason is not None and seq.in_flight:
                seq.ending = reason
            elif reason is not None:
                self._finish(seq, reason)
            elif seq.adapter_key is not None and not seq.admitted:
                error = self.adapters.load_error(seq.adapter_key)
                if error is not None:
                    reason = FINISH_ADAPTER_GONE if self.adapters.is_gone(seq.adapter_key) else FINISH_ERROR
                    self._finish(seq, reason, f"adapter {describe(seq.adapter_key)} failed to load: {error}")

    def _count_admitted(self) -> None:
        with self._lock:
            self._waiting_count = len(self._incoming) + len(self.scheduler.waiting)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        seq.done = True
        self.scheduler.finish(seq)
        rest = seq.rest_of_text()
        if rest:
            seq.handle._emit(TokenEvent((), rest, time.monotonic()))
        seq.handle._emit(FinishEvent(reason, tuple(seq.generated), seq.text, seq.num_prompt, error))
        self._count_admitted()

    def _finish_all(self, reason: str, error: str | None) -> None:
        with self._lock:
            incoming, self._incoming = self._incoming, []
        self.scheduler.waiting.extend(incoming)
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._finish(seq, reason, error)
