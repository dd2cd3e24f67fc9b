"""The model benchmark (``seqkernels-bench speed --ops transformers``): a small Llama built
from a config (random weights, nothing downloaded) with seqkernels attention against
transformers' sdpa and eager attention, in one process on the same model and inputs, timed
in turns (``measure_times_interleaved``): prefill tokens/s, a training step, and decode
tokens/s.

Each row also states the share of the machine's limit measured in the same run: the model's
(estimated) GFLOP/s against a plain matmul of the same dtype for prefill and training, and
its bytes per decoded token (weights plus the KV cache it reads) against the read bandwidth.
"""

from __future__ import annotations

import torch

from .decode import read_bandwidth
from .timing import matmul_roof, measure_time, measure_times_interleaved

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
IMPLS = ("seqkernels", "sdpa", "eager")
# the small Llama; a vocabulary of 8192 keeps the LM head from hiding the attention
MODEL = dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2, head_dim=64, max_position_embeddings=8192 + 256)
QUICK_MODEL = dict(MODEL, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, vocab_size=512)


def grid(quick: bool) -> list[dict]:
    """The cases: (kind, L, B, padding, dtype)."""
    if quick:
        return [dict(kind="prefill", L=128, B=1, padding=False, dtype="float32"),
                dict(kind="train", L=128, B=2, padding=True, dtype="float32"),
                dict(kind="decode", L=64, B=1, padding=False, dtype="float32", new_tokens=8)]
    cases = []
    for dt in DTYPES:
        cases += [dict(kind="prefill", L=L, B=1, padding=False, dtype=dt) for L in (512, 2048)]
        cases += [dict(kind="train", L=L, B=2, padding=pad, dtype=dt) for L in (1024, 2048) for pad in (False, True)]
        cases += [dict(kind="decode", L=L, B=1, padding=False, dtype=dt, new_tokens=128) for L in (512, 4096)]
    return cases


def build_model(quick: bool, dtype: torch.dtype):
    import transformers

    import seqkernels.integrations.transformers as skt

    skt.register()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**(QUICK_MODEL if quick else MODEL))
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)


def _linear_params(model) -> int:
    """Parameters of the layers' linear maps (what a token's matmuls touch), LM head excluded."""
    return sum(p.numel() for n, p in model.model.layers.named_parameters() if p.dim() == 2)


def _attention_flops(cfg, B: int, L: int, lengths=None) -> float:
    """Causal attention's multiply-adds x2 over the real tokens (a padded row counts its length)."""
    lengths = lengths or [L] * B
    return sum(4.0 * cfg.num_attention_heads * n * n / 2 * cfg.head_dim for n in lengths) * cfg.num_hidden_layers


def _impl_fn(model, impl, body):
    def run():
        model.set_attn_implementation(impl)
        return body()
    return run


def case_fns(model, p: dict, impls=IMPLS):
    """(functions by implementation, tokens one call processes, FLOPs or bytes of one call)."""
    cfg = model.config
    B, L = p["B"], p["L"]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    lengths = [L] * B
    if p["padding"]:  # half of the tokens are padding: every row's second half
        mask[:, L // 2:] = 0
        lengths = [L // 2] * B
    n_lin = _linear_params(model)
    if p["kind"] == "prefill":
        model.eval()

        def body():
            with torch.no_grad():
                return model(ids, attention_mask=mask, logits_to_keep=1)
        work = 2.0 * n_lin * sum(lengths) + _attention_flops(cfg, B, L, lengths)
        return {i: _impl_fn(model, i, body) for i in impls}, sum(lengths), work
    if p["kind"] == "train":
        model.train()
        labels = ids.masked_fill(mask == 0, -100)

        def body():
            model.zero_grad(set_to_none=True)
            model(ids, attention_mask=mask, labels=labels).loss.backward()
        lm_head = model.lm_head.weight.numel()
        work = 3.0 * (2.0 * (n_lin + lm_head) * B * L + _attention_flops(cfg, B, L, lengths))
        return {i: _impl_fn(model, i, body) for i in impls}, sum(lengths), work
    return _decode_fns(model, p, ids, impls)


def _decode_fns(model, p, ids, impls):
    """Greedy decoding of new_tokens after a prompt of L, one forward per token with a
    DynamicCache. The prompt's cache is built once (by sdpa) and cropped back to the prompt
    before every run, so each implementation decodes from the same cache."""
    from transformers import DynamicCache

    model.eval()
    cfg, n_new, L = model.config, p["new_tokens"], p["L"]
    cache = DynamicCache(config=cfg)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        first = model(ids, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)

    def body():
        extra = cache.get_seq_length() - L
        if extra:
            cache.crop(-extra)
        tok = first
        with torch.no_grad():
            for _ in range(n_new):
                tok = model(tok, past_key_values=cache).logits[:, -1:].argmax(-1)
        return tok
    elt = next(model.parameters()).element_size()
    weights = (_linear_params(model) + model.lm_head.weight.numel()) * elt
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elt * sum(L + i for i in range(n_new))
    return {i: _impl_fn(model, i, body) for i in impls}, n_new, n_new * weights + kv


def run_transformers(quick: bool, repeat: int = 5, progress=None) -> tuple[list[dict], dict]:
    """Rows of times, tokens/s and ratios, and the limits measured alongside."""
    cases = grid(quick)
    limits = {"read_GBps_1GiB": read_bandwidth((64 << 20) if quick else (1 << 30), repeat=5) / 1e9}
    rows = []
    for dt in dict.fromkeys(c["dtype"] for c in cases):
        dtype = DTYPES[dt]
        limits[f"matmul_GFLOPs_{dt}"] = matmul_roof(dtype, 512 if quick else 2048) / 1e9
        model = build_model(quick, dtype)
        for p in (c for c in cases if c["dtype"] == dt):
            if progress:
                progress.step(f"{p['kind']} L={p['L']} {dt}{' half padding' if p['padding'] else ''}")
            fns, tokens, work = case_fns(model, p)
            rep = max(3, repeat // 2) if p["kind"] != "prefill" else repeat
            times = measure_times_interleaved(fns, warmup=1, repeat=rep)
            row = dict(op="transformers-llama", kind=p["kind"], L=p["L"], B=p["B"],
                       padding="half" if p["padding"] else "none", dtype=dt, tokens=tokens)
            for impl, t in times.items():
                row[f"{impl}_ms"] = t.median_ms
                row[f"{impl}_tokens_per_s"] = tokens / t.median_s
            for other in IMPLS[1:]:
                row[f"speedup_vs_{other}"] = row[f"{other}_ms"] / row["seqkernels_ms"]
            if p["kind"] == "decode":
                row["seqkernels_GBps"] = work / (row["seqkernels_ms"] / 1e3) / 1e9
                row["share_of_read_bw"] = row["seqkernels_GBps"] / limits["read_GBps_1GiB"]
            else:
                row["seqkernels_gflops"] = work / (row["seqkernels_ms"] / 1e3) / 1e9
                row["share_of_matmul_roof"] = row["seqkernels_gflops"] / limits[f"matmul_GFLOPs_{dt}"]
            rows.append(row)
        del model
    return rows, limits
