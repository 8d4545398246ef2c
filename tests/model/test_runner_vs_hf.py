"""Our forward against transformers' on Llama, Mistral and Qwen2 configs (dense and NF4),
and a model directory saved in bitsandbytes 4-bit form."""

import json

import pytest
import torch
from safetensors.torch import save_file

from loraplex.server.model.linear import NF4Linear
from loraplex.server.model.loader import LoadSpec, load_model
from loraplex.server.model.llama import score_sequence
from loraplex.server.model.quantize import QuantSpec, quantize_hf_decoder_
from peft_adapters import TINY as TINY_MODEL


def _tiny_hf(kind: str, path):
    import transformers as tf

    common = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    if kind == "llama3":  # Llama-3-style RoPE scaling
        cfg = tf.LlamaConfig(**common, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        model = tf.LlamaForCausalLM(cfg)
    elif kind == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=8))
    elif kind == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
        with torch.no_grad():  # Qwen2's q/k/v biases are zero at init: make them count
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    else:
        raise ValueError(kind)
    model.eval().save_pretrained(path, safe_serialization=True)
    return model


@pytest.mark.parametrize("kind", ["llama3", "mistral", "qwen2"])
@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_logits_match_transformers(tmp_path, kind, quant):
    hf = _tiny_hf(kind, tmp_path)
    ids = torch.randint(0, 97, (23,)).tolist()  # longer than Mistral's window of 8
    ours = load_model(tmp_path, LoadSpec(quant=QuantSpec(mode=quant)))
    if quant == "nf4":
        quantize_hf_decoder_(hf, torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    got = score_sequence(ours, ids)
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=2e-4)


def test_prequantized_bitsandbytes_directory(tmp_path):
    hf = _tiny_hf("qwen2", tmp_path / "dense")
    quantize_hf_decoder_(hf, torch.float32)
    out = tmp_path / "nf4"
    out.mkdir()
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}  # Linear4bit saves packed data + quant state
    assert any(k.endswith("quant_state.bitsandbytes__nf4") for k in state)
    save_file(state, out / "model.safetensors")
    cfg = json.loads((tmp_path / "dense" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (out / "config.json").write_text(json.dumps(cfg))
    ours = load_model(out, LoadSpec())
    ids = list(range(1, 20))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(score_sequence(ours, ids), ref, atol=2e-4, rtol=2e-4)


def test_pickle_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8, "hidden_size": 8,
        "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(FileNotFoundError, match="pickle weights are refused"):
        load_model(tmp_path, LoadSpec())


def test_adapter_memory_formulas_match_the_allocation():
    from loraplex.server.engine.adapter_pages import AdapterPages, adapter_page_bytes, adapter_slot_bytes

    model = load_model(TINY_MODEL, LoadSpec())
    AdapterPages(model, num_slots=3, max_rank=16, num_pages=5)
    groups = [g for _, g in model.adapter_groups()]
    pages = sum(p.numel() * p.element_size() for g in groups for p in g.a_pages + g.bt_pages)
    g_bytes = sum(s.numel() * s.element_size() for g in groups for s in g.g_stacks + g.out_scales)
    assert adapter_page_bytes(model.config, torch.float32) == sum(g.page_bytes() for g in groups) == pages // 5
    assert adapter_slot_bytes(model.config, torch.float32) == g_bytes // 3


def test_triton_nf4_backend_matches_bitsandbytes():
    """The fused NF4 kernel (Triton's interpreter on CPU) serves the whole tiny model."""
    ids = list(range(1, 12))
    bnb_model = load_model(TINY_MODEL, LoadSpec())
    triton_model = load_model(TINY_MODEL, LoadSpec(nf4_backend="triton"))
    # one stacked NF4 weight per group, repacked for the kernel (bitsandbytes' copy dropped)
    assert all(isinstance(g.base, NF4Linear) and g.base.packed is not None and g.base.weight is None
               for _, g in triton_model.adapter_groups())
    for name in ("down_proj", "k_proj", "up_proj"):  # one alone; slices of q|k|v and gate|up
        torch.testing.assert_close(triton_model.dense_weight(1, name), bnb_model.dense_weight(1, name), atol=0, rtol=0)
    torch.testing.assert_close(score_sequence(triton_model, ids), score_sequence(bnb_model, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_batched_decode_steps_match_transformers(tmp_path, kind):
    """Two sequences of different lengths fed one token per step (the batched decode path,
    with padding, masks and Mistral's window) give transformers' logits at every step."""
    from loraplex.server.engine.step_context import StepContext, StepInputs
    from loraplex.server.model.attention import KVCache
    from loraplex.server.model.ops import model_ops

    hf = _tiny_hf(kind, tmp_path)
    ours = load_model(tmp_path, LoadSpec(quant=QuantSpec(mode="none")))
    c = ours.config
    seqs = [torch.randint(0, 97, (21,)).tolist(), torch.randint(0, 97, (13,)).tolist()]
    cache = KVCache(c.num_layers, 10, 4, c.num_kv_heads, c.head_dim, torch.float32, "cpu")
    tables = [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9]]
    ctx = StepContext(cache, 2, 2, 6, 1, torch.device("cpu"), c.sliding_window, host_layout=True)
    ours.bind(ctx, model_ops("cpu"), 32)
    for step in range(13):  # the shorter sequence ends at 13 tokens
        rows = [t[step // 4] * 4 + step % 4 for t in tables]
        ctx.fill(StepInputs([s[step] for s in seqs], [step, step], rows, [-1, -1], [0, 1, 2], [step + 1] * 2, tables, [0, 1]))
        got = ours()
        with torch.no_grad():
            ref = torch.stack([hf(torch.tensor([s[: step + 1]])).logits[0, -1] for s in seqs])
        torch.testing.assert_close(got, ref, atol=2e-4, rtol=2e-4)
