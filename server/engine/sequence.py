"""One request's state inside the engine: its tokens, how many are in the KV cache,
its adapter slot, the token sampled but not yet on the host, and the incremental
detokenization that turns tokens into a text stream that never shows part of a stop
string or of a UTF-8 character."""

from __future__ import annotations

from dataclasses import dataclass

from loraplex.server.engine.request import RequestHandle


MAX_PENDING_TOKENS = 16  # a UTF-8 character is at most 4 bytes, i.e. 4 byte tokens


@dataclass(eq=False)  # identity: the scheduler's `seq in self.running` must not compare token lists
class Sequence:
    handle: RequestHandle
    adapter_key: object | None  # AdapterKey, None = base model
    tokens: list[int]  # prompt + generated
    num_prompt: int
    seed: int  # the request's sampling stream seed (its own, or drawn at submit)
    slot: int = -1  # adapter slot while running, -1 = base only
    num_computed: int = 0  # tokens whose K/V are in the cache
    admitted: bool = False  # holds a pin on its adapter
    done: bool = False  # finished: a step still in flight has nothing more for it
    ending: str | None = None  # cancelled or late with a token in flight: the finish reason once it lands
    # tokens sampled by launched steps whose ids the host has not read yet (0 or 1 when a
    # step is scheduled; server/engine/in_flight.py), and the row of the newest one in the
    # ids its step sampled: the next step feeds it from there, on the device
    in_flight: int = 0
    in_flight_row: int = -1
    text: str = ""  # decoded text of the generated tokens (stop string cut off)
    emitted_chars: int = 0  # characters of `text` streamed so far
    first_token_time: float | None = None
    # incremental detokenization (update_text): the text of generated[:read_offset], and
    # where the window decoded each step starts (one token of context before the new ones)
    committed_text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0

    @property
    def seq_id(self) -> str:
        return self.handle.request.request_id

    @property
    def params(self):
        return self.handle.request.params

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.num_prompt :]

    @property
    def num_tokens(self) -> int:
        """Tokens known or in flight: positions 0 .. num_tokens - 1 are taken."""
        return len(self.tokens) + self.in_flight

    @property
    def winding_down(self) -> bool:
        """Fed no more: cancelled or late with a token in flight, or its last token is in flight."""
        return self.ending is not None or self.num_tokens - self.num_prompt >= self.params.max_new_tokens

    @property
    def pending(self) -> int:
        """Tokens to feed before the next logits: the uncached prompt, or the last sampled token."""
        return self.num_tokens - self.num_computed

    def update_text(self, decode) -> tuple[str, bool]:
        """Decodes the new tokens; returns (new text to stream, hit a stop string). Holds
        back an incomplete UTF-8 character and any suffix that may start a stop string.

        Incremental, as TGI and vLLM do it: each step decodes only a window from
        prefix_offset (the tokens of the last committed piece, whose text gives the new
        tokens their context: SentencePiece's leading spaces, byte-level merges) and keeps
        the part past the window's committed prefix. Re-decoding the whole output every
        step cost O(length) per token: the engine's host work per decode step at batch 32
        was 0.8, 1.7 and 4.4 ms at 64, 256 and 768 tokens, now 0.44-0.48 ms at all three
        (bench/step_host.py, CPU). A piece that ends in an incomplete UTF-8 character stays
        uncommitted (in `text`, not in `committed_text`) until a later token completes it,
        or MAX_PENDING_TOKENS have piled up (invalid bytes that nothing will complete: the
        window must not grow with the output)."""
        p, n = self.num_prompt, len(self.tokens) - self.num_prompt  # offsets count generated tokens
        prefix = decode(self.tokens[p + self.prefix_offset : p + self.read_offset])
        tail = decode(self.tokens[p + self.prefix_offset :])[len(prefix) :]
        if tail and (not tail.endswith("\ufffd") or n - self.read_offset >= MAX_PENDING_TOKENS):
            self.committed_text += tail
            self.prefix_offset, self.read_offset = self.read_offset, n
            tail = ""
        full = self.committed_text + tail
        stops = self.params.stop_strings
        hit = False
        if stops:
            search_from = max(0, len(self.text) - max(map(len, stops)))
            found = [i for i in (full.find(s, search_from) for s in stops) if i >= 0]
            if found:
                full, hit = full[: min(found)], True
        self.text = full
        end = len(full)
        if not hit:
            while end > self.emitted_chars and full[end - 1] == "\ufffd":
                end -= 1
            for s in stops:
                for k in range(min(len(s) - 1, end - self.emitted_chars), 0, -1):
                    if full[end - k : end] == s[:k]:
                        end -= k
                        break
        delta = full[self.emitted_chars : end]
        self.emitted_chars = max(self.emitted_chars, end)
        return delta, hit

    def rest_of_text(self) -> str:
        """Whatever was held back, at finish."""
        delta = self.text[self.emitted_chars :]
        self.emitted_chars = len(self.text)
        return delta
