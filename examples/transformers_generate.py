"""Generate with seqkernels attention in a Hugging Face transformers model, against sdpa.

Builds a small Llama from a config (random weights: nothing is downloaded) unless a local
model directory is given, generates greedily with both attentions, checks that the tokens
agree and prints tokens/s.

    python examples/transformers_generate.py                 # a small Llama from a config
    python examples/transformers_generate.py path/to/model   # a local checkpoint (from_pretrained)
    python examples/transformers_generate.py --prompt 2048 --new 64

Needs transformers: pip install 'seqkernels[transformers]'.
"""

import argparse
import time

import torch
import transformers

import seqkernels.integrations.transformers as skt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", help="a local model directory (default: a small Llama from a config)")
    ap.add_argument("--prompt", type=int, default=512, help="prompt length in tokens")
    ap.add_argument("--new", type=int, default=128, help="tokens to generate")
    args = ap.parse_args()

    name = skt.register()  # the attention and the mask function, under "seqkernels"
    if args.model:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, attn_implementation=name)
    else:
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                       num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                                       max_position_embeddings=args.prompt + args.new)
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=name)
    model.eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                  pad_token_id=model.config.eos_token_id or 0)

    tokens = {}
    for impl in (name, "sdpa", name, "sdpa"):  # in turns; the second round is reported
        model.set_attn_implementation(impl)
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model.generate(prompt, **kwargs)
            seconds = time.perf_counter() - t0
        tokens[impl] = (out[0, args.prompt:], args.new / seconds)
    same = torch.equal(tokens[name][0], tokens["sdpa"][0])
    print(f"{args.new} tokens after a {args.prompt}-token prompt (prefill included), {torch.get_num_threads()} threads:")
    for impl, (_, rate) in tokens.items():
        print(f"  {impl:>10}: {rate:7.1f} tokens/s")
    print(f"  seqkernels / sdpa: {tokens[name][1] / tokens['sdpa'][1]:.2f}x; same tokens: {same}")


if __name__ == "__main__":
    main()
