"""seqkernels as the attention of Hugging Face transformers models (tiny random-weight models
built from configs; nothing is downloaded).

Every model test compares seqkernels attention with transformers' own sdpa attention (or
eager, where a model has no sdpa path) on the same weights and inputs, and counts the calls
that reached seqkernels, so a test cannot pass by running torch's attention instead.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import seqkernels.integrations.transformers as skt  # noqa: E402
from seqkernels.errors import ArgumentError  # noqa: E402

NAME = skt.register()


@pytest.fixture
def calls(monkeypatch):
    """How many attention calls reached seqkernels during the test: n in all, and
    "lengths" of them through flash_attention with key_lengths (the right-padding form)."""
    counter = {"n": 0, "lengths": 0, "varlen": 0}

    def counting(inner, lengths, varlen=False):
        def call(*args, **kwargs):
            counter["n"] += 1
            counter["lengths"] += lengths and kwargs.get("key_lengths") is not None
            counter["varlen"] += varlen
            return inner(*args, **kwargs)
        return call

    monkeypatch.setattr(skt, "scaled_dot_product_attention", counting(skt.scaled_dot_product_attention, False))
    monkeypatch.setattr(skt, "flash_attention", counting(skt.flash_attention, True))
    monkeypatch.setattr(skt, "flash_attention_varlen", counting(skt.flash_attention_varlen, False, varlen=True))
    return counter


# --- tiny models ---------------------------------------------------------------------------

VOCAB = 97


def _decoder_config(family: str):
    c = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
    if family == "llama":
        return transformers.LlamaConfig(**c)
    if family == "mistral":  # a window shorter than the test sequences, so it matters
        return transformers.MistralConfig(**c, sliding_window=5)
    if family == "qwen2":
        return transformers.Qwen2Config(**c)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    raise ValueError(family)


def _build(config, dtype, impl="sdpa", cls=transformers.AutoModelForCausalLM):
    torch.manual_seed(0)
    return cls.from_config(config, attn_implementation=impl, dtype=dtype).eval()


def _batch(B=3, L=13, padding="none", seed=1):
    """Token ids and a 0/1 attention mask; the rows are padded by different amounts."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    for b, pad in enumerate([0, 4, 7][:B]):
        if pad and padding == "left":
            mask[b, :pad] = 0
        elif pad and padding == "right":
            mask[b, L - pad:] = 0
    return ids, mask


def _logits(model, impl, *args, **kwargs):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(*args, **kwargs).logits


TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def _assert_close(ours, theirs, keep, dtype):
    """Compare at the positions padding does not hide (torch's outputs at a query that sees
    no key are not defined the same way by every implementation)."""
    keep = keep.bool()
    diff = (ours - theirs)[keep].abs().max().item()
    assert diff <= TOL[dtype] * max(1.0, theirs[keep].abs().max().item()), diff


# --- registration --------------------------------------------------------------------------

def test_register_registers_both_interfaces():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert skt.register() == NAME == "seqkernels"  # again: harmless
    assert AttentionInterface._global_mapping[NAME] is skt.attention_forward
    # without the mask function transformers builds no mask for the name: padding is lost
    assert NAME in AttentionMaskInterface._global_mapping


@pytest.mark.parametrize("name", ["my_flash", "sdpa_fast", "flex_attention_x", "paged|mine", ""])
def test_register_refuses_names_transformers_routes_elsewhere(name):
    with pytest.raises(ArgumentError, match="name"):
        skt.register(name)


def test_missing_transformers_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'seqkernels\[transformers\]'"):
        skt.register("other_name")


def test_import_seqkernels_does_not_import_transformers():
    code = "import sys, seqkernels, seqkernels.integrations; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --- logits against sdpa ------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2"])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decoder_logits_match_sdpa(family, padding, dtype, calls):
    model = _build(_decoder_config(family), dtype)
    ids, mask = _batch(padding=padding)
    theirs = _logits(model, "sdpa", ids, attention_mask=mask)
    ours = _logits(model, NAME, ids, attention_mask=mask)
    assert calls["n"] == model.config.num_hidden_layers
    # right padding runs as key lengths; left padding (and a sliding window) reads the mask
    assert calls["lengths"] == (calls["n"] if padding == "right" and family != "mistral" else 0)
    _assert_close(ours, theirs, mask, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bert_padding_matches_sdpa(dtype, calls):
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64)
    model = _build(cfg, dtype, cls=transformers.AutoModel)
    ids, mask = _batch(padding="right")
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        theirs = model(ids, attention_mask=mask).last_hidden_state
        model.set_attn_implementation(NAME)
        ours = model(ids, attention_mask=mask).last_hidden_state
    assert calls["n"] == calls["lengths"] == 2
    _assert_close(ours, theirs, mask, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bart_cross_attention_matches_sdpa(dtype, calls):
    cfg = transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=64)
    model = _build(cfg, dtype, cls=transformers.AutoModelForSeq2SeqLM)
    ids, mask = _batch(padding="right")
    dec, _ = _batch(L=7, seed=2)
    theirs = _logits(model, "sdpa", ids, attention_mask=mask, decoder_input_ids=dec)
    ours = _logits(model, NAME, ids, attention_mask=mask, decoder_input_ids=dec)
    assert calls["n"] == 2 + 2 * 2  # encoder self, decoder self and cross
    assert calls["lengths"] == 2 + 2  # the encoder's padding, in the encoder and in cross-attention
    _assert_close(ours, theirs, torch.ones(dec.shape), dtype)


def test_t5_position_bias_matches_sdpa(calls):
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                decoder_start_token_id=0)
    model = _build(cfg, torch.float64, cls=transformers.AutoModelForSeq2SeqLM)
    ids, mask = _batch(padding="right")
    dec, _ = _batch(L=6, seed=3)
    theirs = _logits(model, "sdpa", ids, attention_mask=mask, decoder_input_ids=dec)
    ours = _logits(model, NAME, ids, attention_mask=mask, decoder_input_ids=dec)
    assert calls["n"] == 6
    _assert_close(ours, theirs, torch.ones(dec.shape), torch.float64)


def test_gemma2_softcap_and_window_match_eager(calls):
    """Gemma 2 has no sdpa path (sdpa refuses softcap); eager is the reference."""
    cfg = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                    attn_logit_softcapping=2.0, max_position_embeddings=64)
    # float32: in float64, eager's float32 softmax turns its float64 minimum mask into -inf, and
    # the NaN of padded rows that see no key (the window hides all their real keys) spreads
    model = _build(cfg, torch.float32, impl="eager")
    ids, mask = _batch(padding="right")
    theirs = _logits(model, "eager", ids, attention_mask=mask)
    ours = _logits(model, NAME, ids, attention_mask=mask)
    assert calls["n"] == 2  # softcap in the kernels (the full layer as key lengths)
    assert calls["lengths"] == 1
    _assert_close(ours, theirs, mask, torch.float32)


# --- packed sequences ------------------------------------------------------------------------

def _packed(rows=((7, 12, 5), (10, 14))):
    """Token ids and position_ids restarting at each sequence, every row the same length."""
    L = sum(rows[0])
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, VOCAB, (len(rows), L), generator=g)
    pos = torch.stack([torch.cat([torch.arange(n) for n in r]) for r in rows])
    return ids, pos


@pytest.mark.parametrize("family", ["llama", "mistral"])  # mistral: a window of 5 inside the sequences
def test_packed_sequences_run_as_varlen_and_match_sdpa(family, calls):
    # transformers detects packing only without a cache (training, or use_cache=False)
    model = _build(_decoder_config(family), torch.float64)
    ids, pos = _packed()
    theirs = _logits(model, "sdpa", ids, position_ids=pos, use_cache=False)
    ours = _logits(model, NAME, ids, position_ids=pos, use_cache=False)
    assert calls["n"] == calls["varlen"] == 2  # both layers through flash_attention_varlen
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    # each sequence alone gives the same logits (the packing is really block-diagonal)
    alone = _logits(model, NAME, ids[:1, 7:19], position_ids=pos[:1, 7:19], use_cache=False)
    torch.testing.assert_close(ours[:1, 7:19], alone, rtol=1e-10, atol=1e-10)


def test_packed_check_runs_once_per_forward(calls, monkeypatch):
    # every layer gets the same mask and position_ids: the check reads them once
    checks = []
    inner = skt._find_packed
    monkeypatch.setattr(skt, "_find_packed", lambda *a: checks.append(1) or inner(*a))
    model = _build(_decoder_config("llama"), torch.float64)
    ids, pos = _packed()
    _logits(model, NAME, ids, position_ids=pos, use_cache=False)
    assert calls["varlen"] == 2 and len(checks) == 1


def test_packed_training_gradients_match_sdpa(calls):
    model = _build(_decoder_config("llama"), torch.float64).train()
    ids, pos = _packed()

    def grads(impl):
        model.set_attn_implementation(impl)
        model.zero_grad()
        model(ids, position_ids=pos, labels=ids, use_cache=False).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    theirs, ours = grads("sdpa"), grads(NAME)
    assert calls["n"] == calls["varlen"] == 2
    for n in theirs:
        torch.testing.assert_close(ours[n], theirs[n], rtol=1e-9, atol=1e-11, msg=n)


def test_packed_batch_check_refuses_other_masks():
    # restarting positions with a mask that is not causal-within-sequences (a padding mask
    # was given): not taken as packed
    q = torch.randn(1, 2, 6, 4)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2]])
    seq = torch.tensor([0, 0, 0, 1, 1, 1])
    block = (seq[:, None] == seq[None, :]) & torch.ones(6, 6, dtype=torch.bool).tril()
    assert skt._packed_batch(q, q, block[None, None], pos, None, True) is not None
    cu, longest = skt._packed_batch(q, q, block[None, None], pos, None, True)
    assert cu.tolist() == [0, 3, 6] and longest == 3 and cu.dtype == torch.int32
    other = block.clone()
    other[4, 3] = False
    assert skt._packed_batch(q, q, other[None, None], pos, None, True) is None
    assert skt._packed_batch(q, q, block[None, None], pos, None, False) is None  # not causal
    assert skt._packed_batch(q, q, block[None, None], torch.arange(6)[None], None, True) is None  # not packed


# --- loading -------------------------------------------------------------------------------

def test_from_pretrained_set_and_apply(tmp_path, calls):
    model = _build(_decoder_config("llama"), torch.float64)
    ids, mask = _batch(padding="left")
    theirs = _logits(model, "sdpa", ids, attention_mask=mask)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=NAME,
                                                               dtype=torch.float64).eval()
    assert loaded.config._attn_implementation == NAME
    with torch.no_grad():
        _assert_close(loaded(ids, attention_mask=mask).logits, theirs, mask, torch.float64)
    model.set_attn_implementation("sdpa")
    assert skt.apply(model) is model and model.config._attn_implementation == NAME
    assert calls["n"] == 2


# --- training ------------------------------------------------------------------------------

def _grads(model, impl, ids, mask):
    model.set_attn_implementation(impl)
    model.zero_grad()
    out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("padding", ["left", "right"])
def test_training_gradients_match_sdpa(padding, calls):
    model = _build(_decoder_config("llama"), torch.float64).train()
    ids, mask = _batch(padding=padding)
    theirs = _grads(model, "sdpa", ids, mask)
    ours = _grads(model, NAME, ids, mask)
    assert calls["n"] == 2 and theirs.keys() == ours.keys()
    for n in theirs:
        torch.testing.assert_close(ours[n], theirs[n], rtol=1e-9, atol=1e-11, msg=n)


def test_training_dropout_runs_in_the_kernels(calls):
    cfg = _decoder_config("llama")
    cfg.attention_dropout = 0.5
    model = _build(cfg, torch.float64).train()
    model.set_attn_implementation(NAME)
    ids, mask = _batch(padding="right")
    torch.manual_seed(5)
    a = model(ids, attention_mask=mask).logits
    torch.manual_seed(5)
    b = model(ids, attention_mask=mask).logits
    c = model(ids, attention_mask=mask).logits
    model.eval()
    with torch.no_grad():
        d = model(ids, attention_mask=mask).logits
    assert torch.equal(a, b)  # the same seed, the same dropout mask
    assert not torch.allclose(a, c) and not torch.allclose(a, d)
    a.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# --- generation ----------------------------------------------------------------------------

@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_greedy_generate_matches_sdpa(cache, family, calls):
    model = _build(_decoder_config(family), torch.float32)
    model.generation_config.pad_token_id = 0
    ids, mask = _batch(padding="left")
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False,
                  cache_implementation=cache)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        theirs = model.generate(ids, **kwargs)
        model.set_attn_implementation(NAME)
        ours = model.generate(ids, **kwargs)
    assert calls["n"] == 10 * model.config.num_hidden_layers
    assert torch.equal(ours, theirs)


# --- torch.compile -------------------------------------------------------------------------

def test_compile_fullgraph_one_graph_same_logits():
    model = _build(_decoder_config("llama"), torch.float32)
    ids, mask = _batch(padding="left")
    eager = _logits(model, NAME, ids, attention_mask=mask)
    graphs = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting_backend, fullgraph=True)
    with torch.no_grad():
        out = compiled(ids, attention_mask=mask).logits
    assert len(graphs) == 1
    assert any("seqkernels" in str(n.target) for n in graphs[0].graph.nodes)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


# --- the attention function's own arguments -------------------------------------------------

class _Module(torch.nn.Module):
    is_causal = True


def _qkv(B=2, H=4, Hk=2, Lq=9, Lk=9, D=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, H, Lq, D, generator=g, dtype=dtype), torch.randn(B, Hk, Lk, D, generator=g, dtype=dtype),
            torch.randn(B, Hk, Lk, D, generator=g, dtype=dtype))


def _sdpa_reference(q, k, v, mask=None):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    m = _Module()
    m.num_key_value_groups = q.shape[1] // k.shape[1]
    return sdpa_attention_forward(m, q, k, v, mask)[0]


@pytest.mark.parametrize("Lq, Lk", [(9, 9), (1, 9), (4, 11)])
def test_attention_function_causality_rule_is_sdpas(Lq, Lk):
    """Top-left causal only without a mask and beyond one row (a static cache's prefill has
    Lk > Lq); a single query row sees every key."""
    q, k, v = _qkv(Lq=Lq, Lk=Lk)
    ours, none = skt.attention_forward(_Module(), q, k, v, None)
    assert none is None and ours.shape == (2, Lq, 4, 8)
    torch.testing.assert_close(ours, _sdpa_reference(q, k, v), rtol=1e-12, atol=1e-12)


def test_attention_function_window_without_a_mask():
    q, k, v = _qkv(Lq=9, Lk=9)
    ours, _ = skt.attention_forward(_Module(), q, k, v, None, sliding_window=3)
    i, j = torch.arange(9)[:, None], torch.arange(9)[None, :]
    window = ((j <= i) & (j > i - 3))[None, None]
    torch.testing.assert_close(ours, _sdpa_reference(q, k, v, mask=window), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("Lq, Lk", [(7, 7), (4, 7)])  # kernels; a static cache's prefill: the fallback
def test_attention_function_softcap_matches_float64_math(Lq, Lk, calls):
    q, k, v = _qkv(Lq=Lq, Lk=Lk)
    q = q * 4
    ours, _ = skt.attention_forward(_Module(), q, k, v, None, softcap=1.5, scaling=0.3)
    assert calls["n"] == (1 if Lq == Lk else 0)
    kr, vr = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    s = 1.5 * torch.tanh(q @ kr.transpose(-2, -1) * 0.3 / 1.5)
    s = s.masked_fill(torch.ones(Lq, Lk, dtype=torch.bool).triu(1), float("-inf"))  # top-left
    ref = (torch.softmax(s, dim=-1) @ vr).transpose(1, 2)
    torch.testing.assert_close(ours, ref, rtol=1e-13, atol=1e-13)


def test_attention_function_softcap_nan_and_empty_rows():
    q, k, v = _qkv(Lq=5, Lk=5)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    mask[0, :, 2] = False  # a row that sees no key
    q[1, 0, 3, 0] = float("nan")
    out, _ = skt.attention_forward(_Module(), q, k, v, mask, softcap=3.0)
    assert (out[0, 2] == 0).all()
    assert out[1, 3, 0].isnan().all() and not out[1, 3, 1:].isnan().any()


def test_attention_function_refuses_sinks_and_warns_on_output_attentions(monkeypatch):
    q, k, v = _qkv()
    with pytest.raises(ArgumentError, match="s_aux"):
        skt.attention_forward(_Module(), q, k, v, None, s_aux=torch.zeros(4))
    messages = []
    monkeypatch.setattr(logging.Logger, "warning_once", lambda self, msg, *a, **k: messages.append(msg),
                        raising=False)
    out, weights = skt.attention_forward(_Module(), q, k, v, None, output_attentions=True)
    assert weights is None and len(messages) == 1 and "output_attentions" in messages[0]
