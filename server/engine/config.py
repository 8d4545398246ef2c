"""Engine settings (one frozen dataclass; argparse lives only in the CLI)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.adapters.form import DEFAULT_MAX_RANK


@dataclass(frozen=True)
class EngineConfig:
    model_dir: Path
    adapter_root: Path | None = None  # adapters found here are registered at start
    quantize: str = "nf4"  # "nf4" (bitsandbytes 4-bit) or "none"
    device: str = "auto"  # "auto" = cuda if available else cpu
    dtype: str = "auto"  # "auto" = bfloat16 on CUDA, float32 on CPU
    max_batch_tokens: int = 2048  # tokens per step (prefill chunks + decode tokens)
    max_running: int = 64  # sequences per step
    max_queue: int = 256  # waiting requests before RESOURCE_EXHAUSTED
    kv_cache_tokens: int = 16384  # KV cache capacity in tokens
    block_size: int = 16  # tokens per KV block
    adapter_slots: int = 16  # device slots (adapters resident at once), capped by adapter_pool_bytes
    adapter_pool_bytes: int = 256 << 20  # device memory for adapter slots
    host_cache_bytes: int = 1 << 30  # host memory for converted adapters
    max_adapter_bytes: int = 512 << 20  # largest adapter file accepted
    max_rank: int = DEFAULT_MAX_RANK  # largest adapter rank accepted
    max_prompt_tokens: int | None = None  # None = the model's context length
    max_new_tokens: int = 4096  # cap on a request's max_new_tokens
    lora_backend: str = "auto"  # "auto" (Triton on CUDA), "torch" or "triton"
    # attention, RoPE + KV-cache write, RMSNorm, SiLU·up: "auto" (Triton on CUDA), "torch" or "triton"
    kernel_backend: str = "auto"
    # CUDA graphs of pure decode steps per batch-size bucket, captured at start (CUDA only)
    cuda_graphs: bool = True
    # launch step N+1 before reading step N's sampled ids, so the host's work (streaming,
    # stop checks, scheduling, staging) runs while the GPU computes: "auto" = on with CUDA.
    # Greedy and seeded tokens are the same either way; a request that ends on a stop costs one more row.
    overlap_steps: str = "auto"
    # VeRA adapters: "shared" keeps each frozen projection once in the pool (an adapter then
    # costs its two vectors) and the kernels read it for every adapter that uses it;
    # "folded" stores λ_d·A and λ_b·B per adapter, like a LoRA of the same rank.
    vera_form: str = "shared"
    # NF4 base matmul: "bnb" (bitsandbytes), "auto" (our fused Triton kernel where its
    # shape policy picks it) or "triton". "bnb" until an H100 run has measured the crossovers.
    nf4_backend: str = "bnb"
    # torch intra-op threads of the engine thread on the CPU; None = every core this process
    # may use but one (threads.py: the helpers run on one torch thread each). On small models
    # 1 is fastest: 32 requests × 32 tokens over 8 adapters on the tiny model took 0.58 s with
    # 1 thread and 1.14 s with 2 (2-core CPU, bench/engine_mixed.py workload).
    cpu_threads: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        if self.adapter_root is not None:
            object.__setattr__(self, "adapter_root", Path(self.adapter_root))
        if self.quantize not in ("nf4", "none"):
            raise ValueError(f"quantize must be 'nf4' or 'none', not {self.quantize!r}")
        if self.vera_form not in ("shared", "folded"):
            raise ValueError(f"vera_form must be shared or folded, not {self.vera_form!r}")
        if self.overlap_steps not in ("auto", "on", "off"):
            raise ValueError(f"overlap_steps must be auto, on or off, not {self.overlap_steps!r}")
        if self.nf4_backend not in ("bnb", "auto", "triton"):
            raise ValueError(f"nf4_backend must be bnb, auto or triton, not {self.nf4_backend!r}")
        if self.lora_backend not in ("auto", "torch", "triton") or self.kernel_backend not in ("auto", "torch", "triton"):
            raise ValueError("lora_backend and kernel_backend must be auto, torch or triton")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, not {self.dtype!r}")
        for name in ("max_batch_tokens", "max_running", "max_queue", "kv_cache_tokens", "block_size", "adapter_slots", "max_rank", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError("cpu_threads must be ≥ 1")
        if self.kv_cache_tokens < self.block_size:
            raise ValueError("kv_cache_tokens must hold at least one block")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return getattr(torch, self.dtype)

    @property
    def num_blocks(self) -> int:
        return self.kv_cache_tokens // self.block_size
