"""The model's tokenizer (Hugging Face `tokenizer.json`, read offline)."""

from __future__ import annotations

from pathlib import Path


class Tokenizer:
    def __init__(self, model_dir: Path | str):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.eos_token_id = self._tok.eos_token_id
        self.vocab_size = len(self._tok)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with the model's BOS if it uses one."""
        return list(self._tok(text, add_special_tokens=True)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)
