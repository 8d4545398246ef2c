"""Next-token choice for the whole batch on the model's device: greedy, or
temperature → top-k → softmax → top-p sampling, with per-row parameters.

Contract:
- `sample(logits, batch)` takes [B, vocab] logits and a `SamplingBatch` of per-row
  parameters (tensors on the same device) and returns [B] int64 token ids, still on the
  device; a row whose logits are not finite gets `SAMPLING_FAILED` (−1), and no other
  row changes. It never synchronises with the host (no `.item()`, no data-dependent
  shapes, no Python branch on a tensor value), so it can be captured in a CUDA graph;
  the caller moves the ids to the host once per step.
- Randomness is a counter-based stream: the draw of row b is a pure function of
  (seed_b, position_b, its logits row, its parameters) — the same tokens whatever else
  is in the batch, at any row index, after preemption and recompute. No torch.Generator.
- `SamplerInputs` stages the per-row parameters in one preallocated host buffer (pinned
  on CUDA) and copies it to the device in one transfer per step.

It knows nothing about sequences, tokenizers or the scheduler.

Semantics of one sampled row (greedy rows: `argmax(logits)`, exactly):

    x = logits / T
    keep = the k largest x (k = vocab when top_k is 0), and any token tied with the k-th
    p = softmax(x over keep)
    keep = the smallest prefix (by p, descending) whose probability reaches top_p, and any
           token tied with its last one; the most likely token always stays
    token = argmax over keep of x + Gumbel(seed, position, token id)

Gumbel-max draws from softmax(x) renormalised over `keep` (exactly, but for the 2^-23
resolution of the uniforms). Ties: at the top-k and top-p cuts, tokens tied with the
last kept value stay; in the final score, the lowest token id wins (argmax's rule).
A row fails when its logits (or logits / T) hold a NaN or +inf, or no finite value;
−inf entries alone are tokens never drawn.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loraplex.server.engine.request import SamplingParams

SAMPLING_FAILED = -1  # the token id of a row whose sampling failed
SAMPLING_FAILED_ERROR = "sampling failed: the logits are not finite"

# -- the counter-based stream -----------------------------------------------------------
# A 32-bit mixing hash (lowbias32, C. Wellons' hash-prospector: x ^= x >> 16;
# x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16), computed in int64
# tensors with every value kept where int64 arithmetic is exact on any backend:
# - each state is masked to [0, 2^32), so every right shift is of a nonnegative number
#   (logical = arithmetic);
# - a multiplier below 2^31 is used as is: product < 2^32 · 2^31 = 2^63, no overflow;
#   0x846ca68b (≥ 2^31) is used as 0x846ca68b − 2^32 (in [−2^31, 0)): the product lies in
#   (−2^63, 0], no overflow, and ≡ x · 0x846ca68b (mod 2^32), so masking with 2^32 − 1
#   (a bitwise and on two's-complement int64, the same on CPU and CUDA) gives the uint32
#   product exactly.
# So the hash bits are identical on CPU and CUDA (and to the uint32 reference in the
# tests). The float transform after it (log) may differ by an ulp between devices, as
# the logits themselves do.
_M32 = 0xFFFFFFFF
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B - (1 << 32)
_ROW_SALT = 0x243F6A88  # digits of pi: any constant; fixes the stream
_KEY2_SALT = 0x9E3779B9


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32, in place (pass a tensor of your own), of int64 values in [0, 2^32) -> int64 values in [0, 2^32).
    In place with one scratch tensor: on CPU it halves the time of a [32, 32000] hash."""
    tmp = torch.empty_like(x)
    for shift, mul in ((16, _MUL1), (15, _MUL2)):
        x.bitwise_xor_(torch.bitwise_right_shift(x, shift, out=tmp)).mul_(mul).bitwise_and_(_M32)
    return x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=tmp))


def stream_bits(seed: torch.Tensor, position: torch.Tensor, vocab: int) -> torch.Tensor:
    """Semantics: bits[b, v] = H(seed[b], position[b], v), 32 random bits in int64.

    seed, position: [B] int64 in [0, 2^63). Returns [B, vocab] int64 in [0, 2^32).
    The row key folds the four 32-bit halves of (seed, position) through _mix32; each
    element is two more rounds keyed by it, so rows with different keys get unrelated
    sequences over v, not shifted copies of one."""
    h = _mix32((seed & _M32) ^ _ROW_SALT)
    h = _mix32(h ^ (seed >> 32))  # seed ≥ 0: the high half is < 2^31
    h = _mix32(h ^ (position & _M32))
    k1 = _mix32(h ^ (position >> 32))  # [B]
    k2 = _mix32(k1 ^ _KEY2_SALT)  # [B]
    v = torch.arange(vocab, dtype=torch.int64, device=seed.device)  # [V]
    return _mix32(_mix32(v[None, :] ^ k1[:, None]).bitwise_xor_(k2[:, None]))  # [B, V]


def stream_uniform(seed: torch.Tensor, position: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, vocab] float32 uniforms in [2^-24, 1 − 2^-24]: the top 23 bits of stream_bits,
    centred in their cell (exact in float32, never 0 or 1)."""
    bits = stream_bits(seed, position, vocab) >> 9  # [B, V] in [0, 2^23)
    return (bits.to(torch.float32) + 0.5) * (2.0**-23)


def gumbel_noise(seed: torch.Tensor, position: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, vocab] float32 Gumbel(0, 1) draws, −log(−log u), in about [−2.8, 16.6]."""
    return -torch.log(-torch.log(stream_uniform(seed, position, vocab)))


def request_seed(params: SamplingParams) -> int:
    """The stream seed of a request: its own, or one drawn on the host for an unseeded one."""
    return params.seed if params.seed is not None else random.getrandbits(63)


# -- per-row parameters -----------------------------------------------------------------
@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling parameters of one step, on the logits' device (views of a
    SamplerInputs buffer: valid until its next fill)."""

    temperature: torch.Tensor  # [B] float32, 1.0 on greedy rows
    top_k: torch.Tensor  # [B] int64, 0 = off (also on greedy rows)
    top_p: torch.Tensor  # [B] float32, 1.0 = off (also on greedy rows)
    seed: torch.Tensor  # [B] int64 in [0, 2^63)
    position: torch.Tensor  # [B] int64, index of the token being sampled
    greedy: torch.Tensor  # [B] bool
    all_greedy: bool  # host-side, from the params: take the argmax path
    filtered: bool  # host-side, from the params: some row uses top-k or top-p

    @property
    def size(self) -> int:
        return self.seed.shape[0]

    @staticmethod
    def build(params: Sequence[SamplingParams], seeds: Sequence[int], positions: Sequence[int], device=None) -> "SamplingBatch":
        """A one-off batch (its own buffers), for callers without a step context."""
        return SamplerInputs(max(1, len(params)), torch.device(device or "cpu")).fill(params, seeds, positions)


class SamplerInputs:
    """Preallocated staging for up to `max_rows` rows: `fill` writes the rows into one host
    buffer (pinned on CUDA), copies it to the device in one transfer, and returns views of
    the first B rows. The device buffer never moves, so a captured graph can read it.

    Layout, one uint8 buffer of 33 · max_rows bytes:
        int64   [3, R]: seed, position, top_k
        float32 [2, R]: temperature, top_p
        bool    [R]:    greedy
    """

    def __init__(self, max_rows: int, device: torch.device | str):
        self.max_rows = r = max_rows
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        nbytes = 33 * r
        self._host = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=cuda)
        self._dev = self._host if self.device.type == "cpu" else torch.zeros(nbytes, dtype=torch.uint8, device=self.device)
        self._copied = torch.cuda.Event() if cuda else None  # the last copy out of _host
        self._h_i64, self._h_f32, self._h_bool = (t.numpy() for t in self._views(self._host, r))  # numpy: fast list writes
        self._d_i64, self._d_f32, self._d_bool = self._views(self._dev, r)

    @staticmethod
    def _views(buf: torch.Tensor, r: int):
        return buf[: 24 * r].view(torch.int64).view(3, r), buf[24 * r : 32 * r].view(torch.float32).view(2, r), buf[32 * r :].view(torch.bool)

    def fill(self, params: Sequence[SamplingParams], seeds: Sequence[int], positions: Sequence[int]) -> SamplingBatch:
        """Writes rows 0..B-1 and returns their batch. params, seeds, positions: B each."""
        b = len(params)
        if not 0 < b <= self.max_rows or len(seeds) != b or len(positions) != b:
            raise ValueError(f"fill takes 1 to {self.max_rows} rows of params, seeds and positions, got {b}, {len(seeds)}, {len(positions)}")
        greedy = [p.greedy for p in params]
        top_k = [0 if g else p.top_k for p, g in zip(params, greedy)]
        temperature = [1.0 if g else p.temperature for p, g in zip(params, greedy)]
        top_p = [1.0 if g else p.top_p for p, g in zip(params, greedy)]
        if self._copied is not None:
            self._copied.synchronize()  # the previous copy has left the host buffer
        h64, h32 = self._h_i64, self._h_f32
        h64[0, :b], h64[1, :b], h64[2, :b] = seeds, positions, top_k
        h32[0, :b], h32[1, :b] = temperature, top_p
        self._h_bool[:b] = greedy
        if self._dev is not self._host:
            self._dev.copy_(self._host, non_blocking=True)  # the step's one host→device copy
            if self._copied is not None:
                self._copied.record(torch.cuda.current_stream(self.device))
        d64, d32 = self._d_i64, self._d_f32
        return SamplingBatch(
            temperature=d32[0, :b], top_k=d64[2, :b], top_p=d32[1, :b], seed=d64[0, :b], position=d64[1, :b],
            greedy=self._d_bool[:b], all_greedy=all(greedy),
            filtered=any(k > 0 or p < 1.0 for k, p in zip(top_k, top_p)),
        )  # fmt: skip


# -- the batched choice -----------------------------------------------------------------
def _allowed(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[B, V] bool: the tokens that survive top-k then top-p, from x = logits / T.

    Each row is sorted once; the kept set is a prefix of the sorted row, turned back into a
    value cut (x ≥ the smallest kept value), so tokens tied with the last kept one stay
    too and the result does not depend on how the sort orders equal values."""
    vocab = x.shape[-1]
    xs = torch.sort(x, dim=-1, descending=True).values  # [B, V]
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)  # [B]
    in_k = xs >= xs.gather(1, (k - 1)[:, None])  # [B, V], a prefix
    probs = torch.softmax(xs.masked_fill(~in_k, float("-inf")), dim=-1)  # [B, V]
    before = torch.nn.functional.pad(torch.cumsum(probs, dim=-1)[:, :-1], (1, 0))  # [B, V] mass ranked above
    in_p = (before < top_p[:, None]) | (top_p[:, None] >= 1.0)  # 1 = off, even when the sum rounds to 1 early
    first = torch.arange(vocab, device=x.device) == 0  # [V]: the most likely token always stays
    keep = (in_k & in_p) | first  # [B, V], a prefix of length ≥ 1
    cut = xs.gather(1, keep.sum(-1, keepdim=True) - 1)  # [B, 1] smallest kept value
    return x >= cut


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Semantics: see the module docstring, row by row.

    logits: [B, vocab] float (float32 expected) on batch's device.
    Returns [B] int64 token ids on that device. A row fails (SAMPLING_FAILED) when its
    logits hold a NaN or +inf, or no finite value (also after / T); −inf entries alone are
    tokens never drawn. Ties in the final score go to the lowest token id."""
    if logits.dim() != 2 or logits.shape[0] != batch.size:
        raise ValueError(f"logits must be [{batch.size}, vocab], got {list(logits.shape)}")
    logits = logits.float()
    if batch.all_greedy:
        return sample_greedy(logits)
    x = logits / batch.temperature[:, None]  # [B, V]; greedy rows: T = 1, x = logits exactly
    ok = torch.isfinite(x.amax(-1))  # [B]: NaN and +inf propagate to the max
    if batch.filtered:
        x = x.masked_fill(~_allowed(x, batch.top_k, batch.top_p), float("-inf"))
    noise = gumbel_noise(batch.seed, batch.position, x.shape[-1])  # [B, V]
    tokens = torch.where(batch.greedy[:, None], x, x + noise).argmax(-1)  # [B]
    return torch.where(ok, tokens, SAMPLING_FAILED)


def sample_greedy(logits: torch.Tensor) -> torch.Tensor:
    """Semantics: argmax(logits, -1), SAMPLING_FAILED where a row's max is not finite.
    logits: [B, vocab] -> [B] int64. One reduction: the max and its (first) index."""
    best, tokens = logits.max(-1)  # [B], [B]; the index is argmax's, ties to the lowest id
    return torch.where(torch.isfinite(best), tokens, SAMPLING_FAILED)


def sample_step(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    seeds: Sequence[int],
    positions: Sequence[int],
    inputs: SamplerInputs | None = None,
) -> torch.Tensor:
    """The engine's entry, one call per step: a greedy-only batch (decided on the host, from
    the params) takes the argmax path and stages nothing; any other fills `inputs` (or
    one-off buffers) and samples. logits: [B, vocab] -> [B] int64 on its device."""
    if all(p.greedy for p in params):
        return sample_greedy(logits.float())
    batch = inputs.fill(params, seeds, positions) if inputs is not None else SamplingBatch.build(params, seeds, positions, logits.device)
    return sample(logits, batch)
