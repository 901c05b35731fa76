"""
Why decoding is slow on this CPU, and what the sampler does about it: fp32 matmul rates at the
decode step's shapes (SmolLM2's linear layers at 1, 8 and 32 rows, and 800 rows as in a prefill),
next to a square 2048 matmul; plain (MKL, what F.linear calls) against weights prepacked for oneDNN
(model.Transformer.prepacked); and the fused q/k/v and gate/up matmuls of model.py against the
separate ones of the checkpoint.

    python -m benchmarks.gemm

"Layers" multiplies through 30 layers of distinct random weights in SmolLM2's shapes, 425 MB, as
one decode step does, so the weights come from memory rather than from cache. Each time is the
best of 5.
"""

import time

import torch
import torch.nn.functional as F

N_LAYER, C, HIDDEN, KV, VOCAB = 30, 576, 1536, 192, 49152
FUSED = ((C + 2 * KV, C), (C, C), (2 * HIDDEN, C), (C, HIDDEN))  # qkv o gate_up down, as in model.py
SEPARATE = ((C, C), (KV, C), (KV, C), (C, C), (HIDDEN, C), (HIDDEN, C), (C, HIDDEN))  # q k v o gate up down


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
    layer_flops = 2 * N_LAYER * sum(o * i for o, i in FUSED)
    weights = {shapes: [[torch.randn(o, i) * 0.02 for o, i in shapes] for _ in range(N_LAYER)]
               for shapes in (FUSED, SEPARATE)}
    packed_weights = {shapes: [[torch.ops.mkldnn._reorder_linear_weight(w) for w in ws] for ws in layers]
                      for shapes, layers in weights.items()}
    vocab = torch.randn(VOCAB, C) * 0.02
    vocab_packed = torch.ops.mkldnn._reorder_linear_weight(vocab)

    print("| rows | layers plain ms (GFLOP/s) | layers prepacked | prepacked, q,k,v and gate,up separate | "
          "vocab plain | vocab prepacked |")
    print("|---|---|---|---|---|---|")
    for M in (1, 8, 32, 800):  # 800: a prefill
        xs = {C: torch.randn(M, C), HIDDEN: torch.randn(M, HIDDEN)}
        cells = []
        for layers, shapes, mm in ((weights[FUSED], FUSED, plain), (packed_weights[FUSED], FUSED, packed),
                                   (packed_weights[SEPARATE], SEPARATE, packed)):
            t = best_seconds(lambda: [mm(xs[i], w) for layer in layers for w, (_, i) in zip(layer, shapes)])
            cells.append(f"{t * 1e3:.1f} ({layer_flops * M / t / 1e9:.0f})")
        for w, mm in ((vocab, plain), (vocab_packed, packed)):
            t = best_seconds(lambda: mm(xs[C], w))
            cells.append(f"{t * 1e3:.1f} ({2 * M * VOCAB * C / t / 1e9:.0f})")
        print(f"| {M} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
