"""`TrainConfig`: everything one training run needs, validated when it is built.

No argparse here (adapters/train/cli.py maps flags onto these fields); nothing is loaded
here, so a bad config fails before any model or data is read. Derived fields (`rank` and `alpha`
when left None) are resolved in `__post_init__`; "auto" device and dtype are resolved by
the trainer, which knows whether CUDA is present.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from loraplex.adapters.form import TARGET_MODULES

ADAPTER_TYPES = ("lora", "lora+", "adalora", "dora", "vera", "loha", "lokr")
SCHEDULES = ("cosine", "constant")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# VeRA's r is its shared projection size; LoHa serves at rank r·r, LoKr (both factors
# decomposed) at most r·r: 8 fits the server's default --max-rank 64
DEFAULT_RANK = {"lora": 8, "lora+": 8, "dora": 8, "adalora": 8, "vera": 256, "loha": 8, "lokr": 8}
# LoRA's init_lora_weights: "default" = PEFT's (A Kaiming-uniform, B zero), "gaussian" = A
# normal(0, 1/r); "pissa" / "olora" rewrite the base at init and are saved converted to plain
# LoRA of rank 2r (trainer.py, variants.py)
INITS = ("default", "gaussian", "pissa", "olora")
BASE_MODIFYING_INITS = ("pissa", "olora")
LORA_CONFIG_TYPES = ("lora", "lora+", "dora")  # the types built from PEFT's LoraConfig


@dataclass(frozen=True)
class TrainConfig:
    model: str  # HF model directory of the base (quantized to NF4 as the server does)
    data: str  # JSONL: {"text": ...} or {"prompt": ..., "completion": ...} per line
    out: str  # output adapter directory
    adapter_type: str = "lora"  # one of ADAPTER_TYPES

    # adapter shape
    rank: int | None = None  # r; None = DEFAULT_RANK[adapter_type] (AdaLoRA uses init_r/target_r instead)
    alpha: float | None = None  # lora_alpha; None = 2 * rank (AdaLoRA: 2 * init_r; unused by VeRA)
    target_modules: tuple[str, ...] = TARGET_MODULES
    dropout: float = 0.0  # lora_dropout; LoHa/LoKr: rank_dropout; VeRA: vera_dropout
    init: str = "default"  # one of INITS (LoRA, LoRA+; DoRA: default or gaussian)
    rslora: bool = False  # use_rslora: scale alpha / sqrt(r) instead of alpha / r (LoRA, LoRA+, DoRA)
    lora_fa: bool = False  # LoRA-FA: A frozen at its init, B trained by PEFT's LoraFAOptimizer (type lora)
    neftune_alpha: float = 0.0  # NEFTune: uniform noise of magnitude alpha / sqrt(L·d) on the input embeddings, training only; 0 = off

    # optimizer and schedule
    lr: float = 2e-4  # for LoRA+: the lr of A; B gets lr * loraplus_ratio
    loraplus_ratio: float = 16.0  # λ = lr_B / lr_A
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 = no clipping
    schedule: str = "cosine"  # warmup, then cosine decay to min_lr_ratio * lr (or constant)
    warmup_steps: int | None = None  # None = round(warmup_ratio * total steps)
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.0

    # AdaLoRA (PEFT's AdaLoraConfig; total_step is the run's number of optimizer steps)
    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5

    # length of the run and batches
    epochs: float | None = None  # None and max_steps None = 1 epoch
    max_steps: int | None = None  # optimizer steps; caps epochs when both are given
    batch_size: int = 8
    grad_accum: int = 1
    max_seq_len: int = 512

    # evaluation, logging, checkpoints
    eval_fraction: float = 0.1  # held-out share of the data (at least one example when > 0)
    eval_every: int = 50  # optimizer steps between eval losses (also at step 0 and at the end); 0 = start and end
    log_every: int = 10  # optimizer steps between train-loss log lines
    save_every: int = 200  # optimizer steps between checkpoints in out/checkpoint-STEP; 0 = none
    seed: int = 0

    # where it runs
    device: str = "auto"  # "auto" = cuda when available, else cpu
    dtype: str = "auto"  # base compute dtype; "auto" = bfloat16 on cuda, float32 on cpu
    gradient_checkpointing: bool = False
    progress: bool = True  # tqdm bar

    extra: dict = field(default_factory=dict, compare=False)  # free-form notes copied into training_run.json

    def __post_init__(self) -> None:
        if self.adapter_type not in ADAPTER_TYPES:
            raise ValueError(f"adapter type must be one of {ADAPTER_TYPES}, not {self.adapter_type!r}")
        if not self.model or not self.data or not self.out:
            raise ValueError("model, data and out are required")
        rank = DEFAULT_RANK[self.adapter_type] if self.rank is None else self.rank
        if rank < 1:
            raise ValueError(f"rank must be >= 1, not {rank}")
        object.__setattr__(self, "rank", rank)
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(2 * (self.init_r if self.adapter_type == "adalora" else rank)))
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, not {self.alpha}")
        targets = tuple(self.target_modules)
        object.__setattr__(self, "target_modules", targets)
        bad = [t for t in targets if t not in TARGET_MODULES]
        if not targets or bad or len(set(targets)) != len(targets):
            raise ValueError(f"target modules must be distinct names from {TARGET_MODULES}, got {list(targets)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, not {self.init!r}")
        init_types = ("lora", "lora+") if self.init in BASE_MODIFYING_INITS else LORA_CONFIG_TYPES
        if self.init != "default" and self.adapter_type not in init_types:
            raise ValueError(f"init {self.init!r} is for types {init_types}, not {self.adapter_type!r}")
        if self.rslora and self.adapter_type not in LORA_CONFIG_TYPES:
            raise ValueError(f"rsLoRA is for types {LORA_CONFIG_TYPES}, not {self.adapter_type!r}")
        if self.lora_fa and self.adapter_type != "lora":
            raise ValueError(f"LoRA-FA is for type 'lora' (it brings its own optimizer), not {self.adapter_type!r}")
        if not (self.neftune_alpha >= 0 and math.isfinite(self.neftune_alpha)):
            raise ValueError(f"neftune_alpha must be a finite number >= 0, not {self.neftune_alpha}")

        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, not {self.lr}")
        if self.loraplus_ratio < 1.0:
            raise ValueError(f"LoRA+ ratio λ (lr_B / lr_A) must be >= 1, not {self.loraplus_ratio}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("weight_decay and max_grad_norm must be >= 0")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, not {self.schedule!r}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, not {self.warmup_steps}")
        if not 0.0 <= self.warmup_ratio < 1.0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("warmup_ratio must be in [0, 1) and min_lr_ratio in [0, 1]")

        if self.adapter_type == "adalora":
            if not 1 <= self.target_r <= self.init_r:
                raise ValueError(f"AdaLoRA needs 1 <= target_r <= init_r, got target_r={self.target_r}, init_r={self.init_r}")
            if self.tinit < 0 or self.tfinal < 0 or self.delta_t < 1:
                raise ValueError("AdaLoRA needs tinit >= 0, tfinal >= 0 and deltaT >= 1")
            if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
                raise ValueError("AdaLoRA's beta1 and beta2 must be in (0, 1)")
            if self.orth_reg_weight < 0:
                raise ValueError(f"orth_reg_weight must be >= 0, not {self.orth_reg_weight}")
            if self.max_steps is not None and self.tinit + self.tfinal >= self.max_steps:
                raise ValueError(
                    f"AdaLoRA needs a budgeting phase: tinit ({self.tinit}) + tfinal ({self.tfinal}) "
                    f"must be < the number of steps ({self.max_steps})"
                )

        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, not {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, not {self.max_steps}")
        for name in ("batch_size", "grad_accum", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")
        if self.max_seq_len < 2:
            raise ValueError("max_seq_len must be >= 2")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), not {self.eval_fraction}")
        for name in ("eval_every", "log_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', not {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, not {self.dtype!r}")

    @property
    def dense_base(self) -> bool:
        """Whether the adapter trains on the dequantized NF4 weights as plain float linears
        (LoHa, LoKr, PiSSA, OLoRA: PEFT cannot put them on bitsandbytes 4-bit layers; variants.py)."""
        return self.adapter_type in ("loha", "lokr") or self.init in BASE_MODIFYING_INITS

    @property
    def epochs_or_default(self) -> float:
        return 1.0 if self.epochs is None and self.max_steps is None else (self.epochs or math.inf)

    def to_json(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d
