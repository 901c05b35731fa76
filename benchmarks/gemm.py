"""
Why decoding is slow on this CPU: fp32 matmul rates at the decode step's shapes (SmolLM2's linear
layers at 1, 8 and 32 rows, and 800 rows as in a prefill), next to a square 2048 matmul; what
prepacking the weights for oneDNN buys (model.Transformer.prepacked); and what fusing q/k/v and
gate/up would buy.

    python -m benchmarks.gemm

"Layers" multiplies through 30 layers of distinct random weights in SmolLM2's shapes, 425 MB, as
one decode step does, so the weights come from memory rather than from cache. Each time is the
best of 5.
"""

import time

import torch
import torch.nn.functional as F

N_LAYER, C, HIDDEN, KV, VOCAB = 30, 576, 1536, 192, 49152
LAYER_SHAPES = [(C, C), (KV, C), (KV, C), (C, C), (HIDDEN, C), (HIDDEN, C), (C, HIDDEN)]  # q k v o gate up down


def best_seconds(fn, n=5):
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def plain(x, w):
    return F.linear(x, w)


def packed(x, w):
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def main():
    torch.manual_seed(0)
    a = torch.randn(2048, 2048)
    print(f"square 2048 matmul: {2 * 2048 ** 3 / best_seconds(lambda: a @ a) / 1e9:.0f} GFLOP/s\n")
    layers = [[torch.randn(o, i) * 0.02 for o, i in LAYER_SHAPES] for _ in range(N_LAYER)]
    layers_packed = [[torch.ops.mkldnn._reorder_linear_weight(w) for w in ws] for ws in layers]
    vocab = torch.randn(VOCAB, C) * 0.02
    vocab_packed = torch.ops.mkldnn._reorder_linear_weight(vocab)
    q, k, v, g, u = (torch.randn(o, C) for o in (C, KV, KV, HIDDEN, HIDDEN))
    qkv, gu = torch.cat([q, k, v]), torch.cat([g, u])
    layer_flops = 2 * N_LAYER * sum(o * i for o, i in LAYER_SHAPES)

    print("| rows | layers ms (GFLOP/s) | layers prepacked | vocab ms (GFLOP/s) | vocab prepacked | gate+up fused / separate | q,k,v fused / separate |")
    print("|---|---|---|---|---|---|---|")
    for M in (1, 8, 32, 800):  # 800: a prefill
        xs = {C: torch.randn(M, C), HIDDEN: torch.randn(M, HIDDEN)}
        cells = []
        for ws, mm in ((layers, plain), (layers_packed, packed)):
            t = best_seconds(lambda: [mm(xs[i], w) for layer in ws for w, (_, i) in zip(layer, LAYER_SHAPES)])
            cells.append(f"{t * 1e3:.1f} ({layer_flops * M / t / 1e9:.0f})")
        for w, mm in ((vocab, plain), (vocab_packed, packed)):
            t = best_seconds(lambda: mm(xs[C], w))
            cells.append(f"{t * 1e3:.1f} ({2 * M * VOCAB * C / t / 1e9:.0f})")
        x = xs[C]
        gu_ratio = best_seconds(lambda: [F.linear(x, gu) for _ in range(20)]) / best_seconds(lambda: [(F.linear(x, g), F.linear(x, u)) for _ in range(20)])
        qkv_ratio = best_seconds(lambda: [F.linear(x, qkv) for _ in range(20)]) / best_seconds(lambda: [(F.linear(x, q), F.linear(x, k), F.linear(x, v)) for _ in range(20)])
        print(f"| {M} | " + " | ".join(cells) + f" | {gu_ratio:.2f} | {qkv_ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
