"""Command line of the trainer: flags -> TrainConfig -> train() -> (optional) upload.

`add_train_arguments(parser)` and `run_train(args)` are mounted as `loraplex train` by
the console script (server/cli.py); `python -m loraplex.adapters.train` runs the same.
Heavy imports (torch, transformers, PEFT) happen in run_train, so `--help` is quick.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from dataclasses import fields

from loraplex.adapters.form import TARGET_MODULES
from loraplex.adapters.train.config import ADAPTER_TYPES, DTYPES, INITS, SCHEDULES, TrainConfig

DESCRIPTION = """\
Train a LoRA, LoRA+, DoRA, VeRA, AdaLoRA, LoHa or LoKr adapter on the NF4-quantized base
(QLoRA), exactly as the loraplex server quantizes it, and write it in PEFT's format
(adapter_config.json + adapter_model.safetensors) with training_run.json and loss_curve.png.

LoHa, LoKr and --init pissa/olora train on the NF4 weights dequantized into plain float
linears (PEFT cannot put them on bitsandbytes 4-bit layers): the very matrices the served NF4
forward multiplies by, held in the compute dtype, so these need the memory of an unquantized
decoder. PiSSA and OLoRA rewrite the base at init; their adapter is saved converted to a
plain LoRA of rank 2r that the server serves on the unmodified NF4 base.

data: JSONL, one object per line: {"text": ...} (loss on all tokens) or
{"prompt": ..., "completion": ...} (loss on the completion only; EOS is appended).

examples:
  loraplex train --model MODEL_DIR --data train.jsonl --type lora --out adapters/my-lora
  loraplex train --model MODEL_DIR --data qa.jsonl --type lora+ --lr 1e-4 --loraplus-ratio 16 \\
      --epochs 3 --out adapters/qa --upload localhost:50051
  loraplex train --model MODEL_DIR --data qa.jsonl --type adalora --init-r 12 --target-r 4 \\
      --tinit 50 --tfinal 100 --max-steps 1000 --out adapters/qa-ada
  loraplex train --model MODEL_DIR --data qa.jsonl --type loha --rank 8 --out adapters/qa-loha
  loraplex train --model MODEL_DIR --data qa.jsonl --init pissa --rslora --neftune-alpha 5 --out adapters/qa-pissa
"""

_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the trainer's flags to `parser` (a fresh parser or a subcommand's)."""
    d = _DEFAULTS
    g = parser.add_argument_group("what to train")
    g.add_argument("--model", required=True, help="base model: a Hugging Face model directory")
    g.add_argument("--data", required=True, help="training data, JSONL (text or prompt/completion)")
    g.add_argument("--type", dest="adapter_type", choices=ADAPTER_TYPES, default=d["adapter_type"],
                   help="adapter type (default: %(default)s)")
    g.add_argument("--out", required=True, help="output directory for the adapter")

    g = parser.add_argument_group("adapter")
    g.add_argument("--rank", "-r", type=int, default=None,
                   help="rank r (default: 8; VeRA: 256, its shared projection size; AdaLoRA uses --init-r/--target-r; "
                        "LoHa serves at rank r*r, LoKr, both factors decomposed, at most r*r: keep that within the "
                        "server's --max-rank)")
    g.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: 2 * rank; AdaLoRA: 2 * init_r)")
    g.add_argument("--target-modules", type=_modules, default=d["target_modules"], metavar="M1,M2,...",
                   help=f"comma-separated modules to adapt, or 'all' (default: all = {','.join(TARGET_MODULES)})")
    g.add_argument("--dropout", type=float, default=d["dropout"],
                   help="adapter dropout; LoHa/LoKr: their rank dropout (default: %(default)s)")
    g.add_argument("--init", choices=INITS, default=d["init"],
                   help="LoRA init: default (A Kaiming, B zero), gaussian, or pissa/olora (principal/QR part of the "
                        "dequantized NF4 weight; trained on a dense base, saved converted to plain LoRA of rank 2r) "
                        "(default: %(default)s)")
    g.add_argument("--rslora", action="store_true", help="rsLoRA scaling alpha / sqrt(r) (lora, lora+, dora)")
    g.add_argument("--lora-fa", action="store_true",
                   help="LoRA-FA: A frozen at its init, B trained with PEFT's LoRA-FA optimizer (type lora)")
    g.add_argument("--neftune-alpha", type=float, default=d["neftune_alpha"], metavar="ALPHA",
                   help="NEFTune: uniform noise of magnitude ALPHA / sqrt(L * d) on the input embeddings while "
                        "training (never at eval or in the saved adapter); 0 = off (default: %(default)s)")

    g = parser.add_argument_group("optimization")
    g.add_argument("--lr", type=float, default=d["lr"], help="learning rate (LoRA+: of A) (default: %(default)s)")
    g.add_argument("--loraplus-ratio", type=float, default=d["loraplus_ratio"], metavar="λ",
                   help="LoRA+: lr of B / lr of A (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="AdamW weight decay (default: %(default)s)")
    g.add_argument("--max-grad-norm", type=float, default=d["max_grad_norm"], help="clip norm, 0 = off (default: %(default)s)")
    g.add_argument("--schedule", choices=SCHEDULES, default=d["schedule"], help="after warmup (default: %(default)s)")
    g.add_argument("--warmup-steps", type=int, default=d["warmup_steps"], help="linear warmup steps (default: warmup ratio)")
    g.add_argument("--warmup-ratio", type=float, default=d["warmup_ratio"], help="warmup share of all steps (default: %(default)s)")
    g.add_argument("--epochs", type=float, default=d["epochs"], help="passes over the training split (default: 1)")
    g.add_argument("--max-steps", type=int, default=d["max_steps"], help="optimizer steps (caps --epochs)")
    g.add_argument("--batch-size", type=int, default=d["batch_size"], help="examples per micro-batch (default: %(default)s)")
    g.add_argument("--grad-accum", type=int, default=d["grad_accum"], help="micro-batches per step (default: %(default)s)")
    g.add_argument("--max-seq-len", type=int, default=d["max_seq_len"], help="tokens per example, longer are cut (default: %(default)s)")
    g.add_argument("--seed", type=int, default=d["seed"], help="(default: %(default)s)")

    g = parser.add_argument_group("AdaLoRA")
    g.add_argument("--init-r", type=int, default=d["init_r"], help="initial rank per module (default: %(default)s)")
    g.add_argument("--target-r", type=int, default=d["target_r"], help="average final rank per module (default: %(default)s)")
    g.add_argument("--tinit", type=int, default=d["tinit"], help="steps before pruning starts (default: %(default)s)")
    g.add_argument("--tfinal", type=int, default=d["tfinal"], help="steps at final ranks at the end (default: %(default)s)")
    g.add_argument("--delta-t", type=int, default=d["delta_t"], help="steps between rank reallocations (default: %(default)s)")
    g.add_argument("--beta1", type=float, default=d["beta1"], help="EMA of sensitivity (default: %(default)s)")
    g.add_argument("--beta2", type=float, default=d["beta2"], help="EMA of uncertainty (default: %(default)s)")
    g.add_argument("--orth-reg-weight", type=float, default=d["orth_reg_weight"], help="orthogonality penalty (default: %(default)s)")

    g = parser.add_argument_group("evaluation and output")
    g.add_argument("--eval-fraction", type=float, default=d["eval_fraction"], help="held-out share of the data (default: %(default)s)")
    g.add_argument("--eval-every", type=int, default=d["eval_every"], help="steps between eval losses, 0 = start/end (default: %(default)s)")
    g.add_argument("--log-every", type=int, default=d["log_every"], help="steps between train-loss log lines (default: %(default)s)")
    g.add_argument("--save-every", type=int, default=d["save_every"], help="steps between checkpoints, 0 = none (default: %(default)s)")
    g.add_argument("--device", default=d["device"], help="auto, cpu or cuda[:N] (default: %(default)s)")
    g.add_argument("--dtype", choices=DTYPES, default=d["dtype"], help="base compute dtype; auto = bf16 on CUDA, fp32 on CPU")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory, slower)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

    g = parser.add_argument_group("upload to a running server")
    g.add_argument("--upload", metavar="HOST:PORT", default=None, help="after training, upload the adapter to this server")
    g.add_argument("--adapter-id", default=None, help="id on the server (default: the --out directory's name)")
    g.add_argument("--admin-token", default=None, help="server admin token (default: $LORAPLEX_ADMIN_TOKEN)")
    g.add_argument("--replace", action="store_true", help="replace an adapter of the same id on the server")
    g.add_argument("--tls", action="store_true", help="upload over TLS, trusting the system's root certificates")
    g.add_argument("--tls-ca", type=Path, default=None, help="upload over TLS, trusting this PEM CA (implies --tls)")
    g.add_argument("--tls-cert", type=Path, default=None, help="PEM client certificate, for servers that require one (with --tls-key)")
    g.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    return parser


def _modules(text: str) -> tuple[str, ...]:
    if text.strip() == "all":
        return TARGET_MODULES
    mods = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in mods if m not in TARGET_MODULES]
    if bad or not mods:
        raise argparse.ArgumentTypeError(f"unknown target modules {bad}; choose from {','.join(TARGET_MODULES)} or 'all'")
    return mods


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    kwargs = {k: v for k, v in vars(args).items() if k in names}
    return TrainConfig(**kwargs, progress=not args.no_progress)


def run_train(args: argparse.Namespace) -> int:
    """Runs `loraplex train` for parsed `args`; returns the exit status."""
    from loraplex.adapters.train.data import DataError

    try:
        cfg = config_from_args(args)
        if args.upload:
            from loraplex.adapters.train.upload import check_target

            check_target(args.upload)
    except ValueError as e:
        print(f"loraplex train: error: {e}", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from tqdm.contrib.logging import logging_redirect_tqdm

    from loraplex.adapters.train.trainer import train

    try:
        with logging_redirect_tqdm():
            result = train(cfg)
    except (DataError, ValueError) as e:
        print(f"loraplex train: error: {e}", file=sys.stderr)
        return 2
    final_eval = result.run["final_eval_loss"]
    print(
        f"adapter written to {result.out_dir} ({cfg.adapter_type}, {result.steps} steps, "
        f"train loss {result.train_losses[-1][1]:.4f}"
        + (f", eval loss {final_eval:.4f}" if final_eval is not None else "")
        + f", {result.tokens_per_s:,.0f} tokens/s, {result.wall_s:.1f} s)"
    )
    if args.upload:
        from loraplex.adapters.train.upload import upload_adapter

        try:
            info = upload_adapter(args.upload, result.out_dir, args.adapter_id, args.admin_token, args.replace,
                                  tls=args.tls, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - any failure of the upload leaves the adapter on disk
            print(f"loraplex train: upload to {args.upload} failed: {_describe(e)} "
                  f"(the adapter stays in {result.out_dir})", file=sys.stderr)
            return 1
        print(f"uploaded to {args.upload} as {info.adapter_id} ({info.adapter_type}, {info.size_bytes:,} bytes)")
    return 0


def _describe(error: Exception) -> str:
    """One line for an upload failure: a gRPC status as CODE: details, else the message."""
    try:
        import grpc
    except ImportError:
        return str(error)
    if isinstance(error, grpc.RpcError) and isinstance(error, grpc.Call):
        return f"{error.code().name}: {error.details()}"
    return str(error)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loraplex.adapters.train", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv))
