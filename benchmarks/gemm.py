"""
Why decoding is slow on this CPU: fp32 matmul rates at the decode step's shapes (SmolLM2's linear
layers at 1, 8 and 32 rows), next to a square 2048 matmul, and what fusing q/k/v and gate/up would buy.

    python -m benchmarks.gemm
"""

import time

import torch
import torch.nn.functional as F


def micros(fn, n=100):
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main():
    torch.manual_seed(0)
    a = torch.randn(2048, 2048)
    print(f"square 2048 matmul: {2 * 2048 ** 3 / micros(lambda: a @ a, 5) / 1e3:.0f} GFLOP/s\n")
    shapes = {"gate/up (1536x576)": (1536, 576), "down (576x1536)": (576, 1536), "vocab (49152x576)": (49152, 576)}
    print("| rows | " + " | ".join(f"{k} us, GFLOP/s" for k in shapes) + " | gate+up fused / separate | q,k,v fused / separate |")
    print("|---|" + "---|" * (len(shapes) + 2))
    q, k, v, g, u = (torch.randn(o, 576) for o in (576, 192, 192, 1536, 1536))
    qkv, gu = torch.cat([q, k, v]), torch.cat([g, u])
    for M in (1, 8, 32):
        x = torch.randn(M, 576)
        cells = []
        for out_f, in_f in shapes.values():
            w, xi = torch.randn(out_f, in_f), torch.randn(M, in_f)
            t = micros(lambda: F.linear(xi, w), 20 if out_f > 10000 else 100)
            cells.append(f"{t:.0f}, {2 * M * out_f * in_f / t / 1e3:.0f}")
        gu_ratio = micros(lambda: F.linear(x, gu)) / micros(lambda: (F.linear(x, g), F.linear(x, u)))
        qkv_ratio = micros(lambda: F.linear(x, qkv)) / micros(lambda: (F.linear(x, q), F.linear(x, k), F.linear(x, v)))
        print(f"| {M} | " + " | ".join(cells) + f" | {gu_ratio:.2f} | {qkv_ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
