"""Builds the tiny Llama-family model that the tests and the default server use: a
byte-level tokenizer, a small config, and weights pretrained for a few hundred steps on
a corpus this module generates itself (no hub, no download).

    python -m loraplex.server.model.tiny --out DIR [--steps N] [--seed S]

The result is an ordinary Hugging Face model directory (config.json, model.safetensors,
tokenizer.json): transformers, PEFT and loraplex's runner all read it.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

import torch

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2; bytes follow from id 3


@dataclass(frozen=True)
class TinySpec:
    hidden_size: int = 128
    intermediate_size: int = 320
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    pretrain_steps: int = 400
    batch_size: int = 16
    seq_len: int = 96
    lr: float = 3e-3
    seed: int = 0


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 3 special tokens + 256 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: _byte_of(c))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({c: i + len(SPECIAL_TOKENS) for i, c in enumerate(byte_chars)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=1024
    )


def _byte_of(char: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode for one character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(map(chr, cs), bs))[char]


_SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the robot", "a small bird", "the teacher", "our team"]
_VERBS = ["sees", "likes", "finds", "builds", "paints", "carries", "watches", "follows"]
_OBJECTS = ["the red ball", "a green tree", "the river", "a new house", "the moon", "a blue boat", "the garden"]
_TAILS = ["today", "at night", "in the park", "with joy", "again", "every morning", "near the sea"]


def corpus_sentence(rng: random.Random) -> str:
    """One sentence of the generated pretraining corpus (also used by demo-adapter data)."""
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."


def build_tiny_model(out: Path, spec: TinySpec = TinySpec(), progress: bool = True) -> Path:
    """Writes config, tokenizer and pretrained weights of the tiny model into `out`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.seed)
    rng = random.Random(spec.seed)
    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=spec.rope_theta,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    if spec.pretrain_steps:
        _pretrain(model, tokenizer, spec, rng, progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _pretrain(model, tokenizer, spec: TinySpec, rng: random.Random, progress: bool) -> None:
    from tqdm import tqdm

    text = " ".join(corpus_sentence(rng) for _ in range(20000))
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])  # [N]
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.pretrain_steps, pct_start=0.1)
    model.train()
    bar = tqdm(range(spec.pretrain_steps), desc="pretrain tiny model", disable=not progress)
    for _ in bar:
        starts = torch.randint(0, ids.numel() - spec.seq_len - 1, (spec.batch_size,))
        batch = torch.stack([ids[s : s + spec.seq_len] for s in starts.tolist()])  # [B, L]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build loraplex's tiny Llama-family model (no hub needed).")
    parser.add_argument("--out", type=Path, required=True, help="output model directory")
    parser.add_argument("--steps", type=int, default=TinySpec.pretrain_steps, help="pretraining steps (0 = random weights)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_tiny_model(args.out, TinySpec(pretrain_steps=args.steps, seed=args.seed))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
