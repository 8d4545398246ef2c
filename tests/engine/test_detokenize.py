"""Incremental detokenization (Sequence.update_text): the text built from a small window
of new tokens each step is the text of decoding the whole output, token after token, for
the bundled byte-level BPE tokenizer and for a SentencePiece-style one (Metaspace spaces,
byte fallback, the leading space stripped), with incomplete UTF-8 characters held back
and stop strings cut."""

import random
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models

from loraplex.server.engine.sequence import Sequence
from loraplex.server.engine.tokenizer import Tokenizer
from peft_adapters import TINY


def sentencepiece_like():
    """Llama-2's decoder over a small vocabulary: ▁ for spaces, <0x..> byte tokens (€ is E2 82 AC)."""
    pieces = ["<unk>", "<s>", "</s>", "<0xE2>", "<0x82>", "<0xAC>", "<0xC3>", "<0xA9>", "▁the", "▁cat", "s", "▁", "a", "!", "▁caf"]
    raw = RawTokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], byte_fallback=True, unk_token="<unk>"))
    raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return lambda ids: raw.decode(ids, skip_special_tokens=True), list(range(3, len(pieces)))


def bundled():
    tok = Tokenizer(TINY)
    return tok.decode, list(range(3, tok.vocab_size))


def sequence(stops=()):
    params = SimpleNamespace(stop_strings=list(stops))
    return Sequence(SimpleNamespace(request=SimpleNamespace(request_id="r", params=params)), None, [1, 5, 6], 3, seed=0)


def check_stream(decode, tokens):
    """Feeds `tokens` one at a time: wherever re-decoding the whole output gives whole
    characters, the incremental text is that; the stream is a prefix of the end's text."""
    seq, streamed = sequence(), ""
    for t in tokens:
        seq.tokens.append(t)
        delta, hit = seq.update_text(decode)
        streamed += delta
        whole = decode(seq.generated)
        assert not hit and not streamed.endswith("\ufffd")
        if "\ufffd" not in whole:
            assert seq.text == whole
    final = decode(seq.generated)
    assert final.startswith(streamed) and streamed + seq.rest_of_text() == final == seq.text


def test_byte_level_bpe_text_is_the_whole_decode_at_every_token():
    decode, ids = bundled()
    rng = random.Random(0)
    for _ in range(40):  # any bytes: the byte-level decoder replaces only the invalid sequences
        tokens = [rng.choice(ids) for _ in range(rng.randrange(1, 60))]
        seq, streamed = sequence(), ""
        for t in tokens:
            seq.tokens.append(t)
            streamed += seq.update_text(decode)[0]
            assert seq.text == decode(seq.generated)
        assert streamed + seq.rest_of_text() == decode(seq.generated)
    check_stream(decode, Tokenizer(TINY).encode("the café costs 5€ — naïve 日本語 ok"))  # multi-byte characters over tokens


def test_sentencepiece_text_is_the_whole_decode_at_every_token():
    decode, _ = sentencepiece_like()
    # whole characters, in tokens: "the", " cat", "s", " ", "a", "!", " caf", é (C3 A9), € (E2 82 AC)
    units = [[8], [9], [10], [11], [12], [13], [14], [6, 7], [3, 4, 5]]
    rng = random.Random(1)
    for _ in range(60):
        check_stream(decode, [t for _ in range(rng.randrange(1, 25)) for t in rng.choice(units)])


def test_a_multibyte_character_split_over_tokens_is_held_back_until_whole():
    decode, _ = sentencepiece_like()
    seq, out = sequence(), []
    for t in (8, 11, 3, 4, 5, 13):  # "the", " ", E2, 82, AC (€), "!"
        seq.tokens.append(t)
        out.append(seq.update_text(decode)[0])
    assert out == ["the", " ", "", "", "€", "!"] and seq.text == "the €!"


def test_a_stop_string_across_tokens_is_cut_and_never_streamed():
    decode, _ = sentencepiece_like()
    seq, streamed = sequence(stops=["cat"]), ""
    for t in (8, 9):  # "the", " cat"
        seq.tokens.append(t)
        delta, hit = seq.update_text(decode)
        streamed += delta
    assert hit and seq.text == "the " and "cat" not in streamed


def test_the_tokenizers_decode_is_transformers_decode():
    """Tokenizer.decode calls the Rust tokenizer directly where transformers' decode is exactly that."""
    tok = Tokenizer(TINY)
    assert tok._backend is not None  # the bundled model's is the stock fast tokenizer
    rng = random.Random(2)
    for _ in range(500):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(30))]  # special tokens among them
        assert tok.decode(ids) == tok._tok.decode(ids, skip_special_tokens=True)
