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
        self._backend = _plain_backend(self._tok)

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
        """The text of `ids`, special tokens left out (called for every streamed token)."""
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=True)
        return self._tok.decode(ids, skip_special_tokens=True)


def _plain_backend(tok):
    """The Rust tokenizer behind `tok` where transformers' decode is exactly its decode
    (the stock fast-tokenizer `_decode`, no clean-up of spaces), else None. transformers'
    wrapper converts and checks every id in Python first: 3 of the 4 µs of a short decode."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    stock = getattr(type(tok), "_decode", None) is TokenizersBackend._decode
    return tok.backend_tokenizer if stock and not tok.clean_up_tokenization_spaces else None
