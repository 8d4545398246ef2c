"""A launched step whose sampled token ids are still on their way to the host.

With overlapped steps (EngineConfig.overlap_steps) the engine thread launches step N+1
before it reads step N's ids: N+1 feeds each decode row's new token straight from N's
ids on the device (StepInputs.carry_*), and the host streams N's tokens, checks stops
and detokenizes while the GPU runs N+1. A step's ids therefore cross to the host
through one of two pinned buffers used in turn: step N+2 writes the buffer that step N
used, and the host read N's ids before it launched N+2.

On the CPU the forward has run by the time the step is launched, and the ids are
already on the host: the same path, with nothing to wait for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.server.engine.sequence import Sequence


@dataclass(frozen=True)
class LaunchedStep:
    seqs: list[Sequence]  # the rows of `chosen`, in order; each holds one in-flight token
    chosen: torch.Tensor  # [B] int64 on the model's device: the next step feeds its rows from here
    host: torch.Tensor  # [B] int64 on the host, written by the copy
    copied: torch.cuda.Event | None  # recorded after the copy (None: on the CPU, nothing to wait for)

    def token_ids(self) -> list[int]:
        """The sampled ids; waits for the copy, i.e. for the step to finish on the device."""
        if self.copied is not None:
            self.copied.synchronize()
        return self.host.tolist()


class IdTransfer:
    """Moves each launched step's [B] sampled ids to the host, without waiting."""

    def __init__(self, max_rows: int, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        if self.cuda:
            self._buffers = [torch.empty(max_rows, dtype=torch.int64, pin_memory=True) for _ in range(2)]
            self._events = [torch.cuda.Event() for _ in range(2)]
        self._turn = 0

    def launch(self, seqs: list[Sequence], chosen: torch.Tensor) -> LaunchedStep:
        """chosen: [B] int64 ids of `seqs`' rows (B ≤ max_rows), on the model's device."""
        if not self.cuda:
            return LaunchedStep(seqs, chosen, chosen, None)
        host, event = self._buffers[self._turn][: chosen.shape[0]], self._events[self._turn]
        self._turn ^= 1
        host.copy_(chosen, non_blocking=True)
        event.record(torch.cuda.current_stream(self.device))  # the copy's stream, whatever the thread's device
        return LaunchedStep(seqs, chosen, host, event)
