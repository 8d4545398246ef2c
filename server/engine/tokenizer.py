"""The model's tokenizer (Hugging Face `tokenizer.json`, read offline)."""

from __future__ import annotations

from pathlib import Path


class Tokenizer:
    def __init__(self, model_dir: Path | str):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.eos_token_id = self._tok.eos_token_id
        self.vocab_size = len(self._tok)
        self.chat_template: str | None = getattr(self._tok, "chat_template", None) or None  # tokenizer_config.json's

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with the model's BOS if it uses one."""
        return list(self._tok(text, add_special_tokens=True)["input_ids"])

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of `messages` ({"role", "content"} dicts) rendered with the chat template,
        ending with the assistant's turn; the template adds the special tokens it wants."""
        if not self.chat_template:
            raise ValueError("the model has no chat template")
        text = self._tok.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True)
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)
