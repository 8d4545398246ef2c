"""Training data: JSONL in, padded token batches out.

Each non-blank line of the file is one JSON object, either
    {"text": "..."}                              loss on every token, or
    {"prompt": "...", "completion": "..."}       loss on the completion tokens only.
Other keys are ignored. A bad line raises `DataError` naming the file and line number.

Tokenization matches what a server does with a prompt: the prompt is tokenized alone
with the tokenizer's special tokens (BOS), the completion without them and followed by
EOS, so a model trained here stops where its completions stopped. Labels are -100 on
BOS, prompt and padding. This module knows nothing about models or adapters.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

IGNORE_INDEX = -100


class DataError(ValueError):
    """A training file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    prompt: str  # "" for a text example
    completion: str  # the text the loss is taken on


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: tuple[int, ...]  # [L]
    labels: tuple[int, ...]  # [L], IGNORE_INDEX where no loss is taken

    @property
    def num_label_tokens(self) -> int:
        # labels shift left by one inside the loss: the first position is never a target
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, L] long, right-padded
    attention_mask: torch.Tensor  # [B, L] long, 0 on padding
    labels: torch.Tensor  # [B, L] long, IGNORE_INDEX on prompt and padding

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens, the unit of tokens/s."""
        return int(self.attention_mask.sum())

    @property
    def num_label_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def read_jsonl(path: str | Path) -> list[Example]:
    """Reads a JSONL training file. Raises DataError with `path:line` for the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    examples = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            examples.append(parse_line(line, f"{path}:{lineno}"))
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples


def parse_line(line: str, where: str) -> Example:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    has_text = "text" in obj
    has_pair = "prompt" in obj or "completion" in obj
    if has_text and has_pair:
        raise DataError(f"{where}: give either 'text' or 'prompt'/'completion', not both")
    if has_text:
        text = obj["text"]
        if not isinstance(text, str) or not text:
            raise DataError(f"{where}: 'text' must be a non-empty string")
        return Example(prompt="", completion=text)
    if not has_pair:
        raise DataError(f"{where}: needs a 'text' key or 'prompt' and 'completion' keys (has {sorted(obj)})")
    for key in ("prompt", "completion"):
        if key not in obj:
            raise DataError(f"{where}: has no '{key}' key")
        if not isinstance(obj[key], str):
            raise DataError(f"{where}: '{key}' must be a string, not {type(obj[key]).__name__}")
    if not obj["completion"]:
        raise DataError(f"{where}: 'completion' is empty (there would be nothing to learn)")
    return Example(prompt=obj["prompt"], completion=obj["completion"])


def tokenize(examples: Sequence[Example], tokenizer, max_seq_len: int) -> list[TokenizedExample]:
    """Token ids and labels per example, truncated to max_seq_len. Examples whose
    completion is cut away entirely are dropped (see `tokenize_report`)."""
    return tokenize_report(examples, tokenizer, max_seq_len)[0]


def tokenize_report(examples: Sequence[Example], tokenizer, max_seq_len: int) -> tuple[list[TokenizedExample], int]:
    """As `tokenize`, also returning how many examples were dropped."""
    eos = tokenizer.eos_token_id
    out, dropped = [], 0
    for ex in examples:
        if ex.prompt:
            prompt_ids = list(tokenizer(ex.prompt, add_special_tokens=True)["input_ids"])
            completion_ids = list(tokenizer(ex.completion, add_special_tokens=False)["input_ids"])
        else:  # text: the BOS (if any) is context, every other token a target
            ids = list(tokenizer(ex.completion, add_special_tokens=True)["input_ids"])
            n_special = 1 if ids and ids[0] == tokenizer.bos_token_id else 0
            prompt_ids, completion_ids = ids[:n_special], ids[n_special:]
        if eos is not None:
            completion_ids.append(eos)
        input_ids = (prompt_ids + completion_ids)[:max_seq_len]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_seq_len]
        tok = TokenizedExample(tuple(input_ids), tuple(labels))
        if tok.num_label_tokens == 0:
            dropped += 1
            continue
        out.append(tok)
    return out, dropped


def split(examples: Sequence, eval_fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval): a seeded shuffle, then the last round(eval_fraction * n) examples
    (at least one when eval_fraction > 0 and n >= 2) are held out."""
    items = list(examples)
    random.Random(seed).shuffle(items)
    n_eval = 0
    if eval_fraction > 0 and len(items) >= 2:
        n_eval = min(len(items) - 1, max(1, round(eval_fraction * len(items))))
    return items[: len(items) - n_eval], items[len(items) - n_eval :]


def collate(examples: Sequence[TokenizedExample], pad_id: int) -> Batch:
    """Right-pads a list of examples into one Batch."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    return Batch(ids, mask, labels)


def batches(examples: Sequence[TokenizedExample], batch_size: int, pad_id: int, rng: random.Random | None = None) -> Iterator[Batch]:
    """One pass over `examples` in batches (shuffled by `rng` when given; the last batch may be short)."""
    order = list(range(len(examples)))
    if rng is not None:
        rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start : start + batch_size]], pad_id)


def endless_batches(examples: Sequence[TokenizedExample], batch_size: int, pad_id: int, seed: int) -> Iterator[Batch]:
    """Shuffled epochs, one after another, forever."""
    if not examples:
        raise DataError("no training examples left (all held out for eval, or all cut away by max_seq_len)")
    rng = random.Random(seed)
    while True:
        yield from batches(examples, batch_size, pad_id, rng)


def pad_id_of(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    return 0
