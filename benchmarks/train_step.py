"""
One training step's time and peak memory: our update (chunked, checkpointed log-probs of completion
tokens only) against the straightforward transformers one (full logits, log_softmax, gather), on the
same batch of SmolLM2 rollouts. Each side runs in a fresh subprocess, so its peak RSS is its own.

    python -m benchmarks.train_step                  # 24 rows x 220 tokens (60 prompt + 160 completion)
    python -m benchmarks.train_step --dtype bfloat16 --micro-batch 8   # both sides under bf16 autocast

Completions are 80 to 160 tokens long. Ours orders the rows by length into micro-batches, each computed
at its own width, as train.py does; transformers computes every row at the whole batch's width, as a
straightforward trainer does.
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def batch(rows, prompt, completion, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(100, vocab, (rows, prompt + completion), generator=g)
    lens = torch.randint(completion // 2, completion + 1, (rows,), generator=g)
    mask = torch.zeros(rows, prompt + completion, dtype=torch.bool)
    for i, n in enumerate(lens.tolist()):
        mask[i, prompt:prompt + n] = True
    return tokens, mask


def run_ours(args):
    import vspo
    from rollout import Rollouts, completion_logprobs
    from data.load import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(None)
    tokens, mask = batch(args.rows, args.prompt, args.completion, model.config.vocab_size)
    r = Rollouts(tokens=tokens, prompt_lens=torch.full((args.rows,), args.prompt), completion_mask=mask,
                 logprobs=torch.zeros(tokens.shape), finish_reasons=["stop"] * args.rows,
                 coeffs=torch.zeros(args.rows), prompt_index=torch.arange(args.rows),
                 prompt_width=args.prompt, vocab_size=model.config.vocab_size)
    m = mask[:, args.prompt:]
    adv = torch.randn(args.rows)
    order = sorted(range(args.rows), key=lambda i: int(m[i].sum()))  # as train.py groups them
    t0 = time.perf_counter()
    for i in range(0, args.rows, args.micro_batch):
        rows = order[i:i + args.micro_batch]
        with autocast(args):
            logp, _ = completion_logprobs(model, r, rows, 1.0)
            loss, _ = vspo.policy_loss(logp, logp.detach(), adv[rows], m[rows], float(args.rows))
        loss.backward()
    return time.perf_counter() - t0


def autocast(args):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")


def run_transformers(args):
    import transformers
    from data.smollm2 import prepare

    model = transformers.AutoModelForCausalLM.from_pretrained(prepare(), dtype=torch.float32)
    model.train()
    tokens, mask = batch(args.rows, args.prompt, args.completion, model.config.vocab_size)
    adv = torch.randn(args.rows)
    t0 = time.perf_counter()
    for i in range(0, args.rows, args.micro_batch):
        sl = slice(i, i + args.micro_batch)
        with autocast(args):
            logits = model(tokens[sl]).logits[:, :-1].float()  # the usual way: (rows, time, vocab)
            logp = torch.log_softmax(logits, -1).gather(-1, tokens[sl, 1:, None]).squeeze(-1)
            m = mask[sl, 1:].float()
            loss = -(((logp - logp.detach()).exp() * adv[sl, None] * m).sum(1) / m.sum(1)).sum() / args.rows
        loss.backward()
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--prompt", type=int, default=60)
    parser.add_argument("--completion", type=int, default=160)
    parser.add_argument("--micro-batch", type=int, default=24,
                        help="rows per forward/backward (24: the whole batch at once)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="bfloat16: both sides under torch.autocast, weights in fp32 (as train.py)")
    parser.add_argument("--side", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # the child process: run one side, report its time and peak RSS
        seconds = run_ours(args) if args.side == "ours" else run_transformers(args)
        print(json.dumps({"seconds": seconds,
                          "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
        return
    tokens = args.rows * (args.prompt + args.completion)
    print(f"one update, {args.rows} rows x {args.prompt + args.completion} tokens, micro-batch "
          f"{args.micro_batch}, {args.dtype}\n")
    print("| | seconds | tokens/s | peak RSS (GB) |\n|---|---|---|---|")
    results = {}
    for side in ("ours", "transformers"):
        cmd = [sys.executable, "-m", "benchmarks.train_step", "--side", side] + sys.argv[1:]
        results[side] = json.loads(subprocess.run(cmd, capture_output=True, text=True,
                                                  check=True).stdout.strip().splitlines()[-1])
        r = results[side]
        print(f"| {side} | {r['seconds']:.1f} | {tokens / r['seconds']:.0f} | {r['peak_rss_gb']:.2f} |",
              flush=True)
    o, t = results["ours"], results["transformers"]
    print(f"\nours / transformers: {t['seconds'] / o['seconds']:.2f}x the speed, "
          f"{o['peak_rss_gb'] / t['peak_rss_gb']:.2f}x the peak memory")


if __name__ == "__main__":
    main()
