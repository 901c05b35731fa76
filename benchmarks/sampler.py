"""
Sampler throughput: rollout.generate against transformers' generate, same model, same settings, same run.

    python -m benchmarks.sampler                 # batch 1, 8, 32; 128 new tokens; fp32 and bf16
    python -m benchmarks.sampler --batches 8 --dtypes float32

Both sample at temperature 1 with no top-k/top-p and never stop early, from the same
chat prompt repeated B times. Prints tokens/s, the ratio ours/transformers, and per-token
FLOPs and bytes next to this machine's measured matmul rate and memory bandwidth, so the
distance to the hardware's limits is visible.
"""

import argparse
import time

import torch

from rollout import generate
from steer import load_model_and_tokenizer


def machine_limits():
    """Measured here, now: fp32/bf16 matmul GFLOP/s (2048^2) and copy bandwidth GB/s."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(2048, 2048, dtype=dtype)
        a @ a
        t0 = time.perf_counter()
        for _ in range(5):
            a @ a
        out[str(dtype)] = 5 * 2 * 2048 ** 3 / (time.perf_counter() - t0) / 1e9
    x = torch.empty(128 * 2 ** 20, dtype=torch.float32)  # 512 MiB
    y = torch.empty_like(x)
    y.copy_(x)
    t0 = time.perf_counter()
    for _ in range(3):
        y.copy_(x)
    out["bandwidth"] = 3 * 2 * x.numel() * 4 / (time.perf_counter() - t0) / 1e9  # read + write
    return out


def per_token_cost(config, batch, seq_len, bytes_per_param):
    """FLOPs and bytes moved per generated token at one decode step (average context seq_len)."""
    C, L, V = config.n_embd, config.n_layer, config.vocab_size
    kv = config.n_kv_head * config.head_dim
    per_layer = C * config.n_head * config.head_dim * 2 + C * kv * 2 + 3 * C * config.intermediate_size
    matmul_params = L * per_layer + V * C  # the vocabulary projection included
    flops = 2 * matmul_params + 4 * L * seq_len * config.n_head * config.head_dim  # weights + attention scores/values
    weight_bytes = matmul_params * bytes_per_param / batch  # weights are read once per step, shared by the batch
    cache_bytes = 2 * L * seq_len * kv * bytes_per_param  # each row reads its own keys and values
    return flops, weight_bytes + cache_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    import transformers

    limits = machine_limits()
    print(f"machine: {torch.get_num_threads()} threads, matmul fp32 {limits['torch.float32']:.0f} GFLOP/s, "
          f"bf16 {limits['torch.bfloat16']:.0f} GFLOP/s, copy bandwidth {limits['bandwidth']:.1f} GB/s\n")
    print("| dtype | batch | ours tok/s | transformers tok/s | ratio | GFLOP/token | MB/token | ours GFLOP/s | ours GB/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        model, tok = load_model_and_tokenizer(None, "cpu", dtype)
        ref = transformers.AutoModelForCausalLM.from_pretrained(model.source, dtype=dtype).eval()
        prompt = tok.chat([{"role": "user", "content": "Tell me a long story about a dragon who learns to count."}])
        G = args.new_tokens
        generate(model, [prompt], n=2, max_new_tokens=4)  # warm up both
        ref.generate(torch.tensor([prompt] * 2), do_sample=True, max_new_tokens=4, min_new_tokens=4)
        for B in [int(b) for b in args.batches.split(",")]:
            t0 = time.perf_counter()
            r = generate(model, [prompt], n=B, max_new_tokens=G, temperature=1.0, seed=0)
            ours = int(r.completion_lens.sum()) / (time.perf_counter() - t0)
            torch.manual_seed(0)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = ref.generate(torch.tensor([prompt] * B), do_sample=True, temperature=1.0, top_k=None, top_p=None,
                                   max_new_tokens=G, min_new_tokens=G, pad_token_id=0)
            theirs = (out.shape[1] - len(prompt)) * B / (time.perf_counter() - t0)
            flops, nbytes = per_token_cost(model.config, B, len(prompt) + G // 2, dtype.itemsize)
            print(f"| {dtype_name} | {B} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x | {flops / 1e9:.3f} | "
                  f"{nbytes / 1e6:.1f} | {ours * flops / 1e9:.0f} | {ours * nbytes / 1e9:.1f} |", flush=True)


if __name__ == "__main__":
    main()
