"""
What running under torchrun costs or saves on this machine, measured against one process in the same run.

    python -m benchmarks.distributed                       # the step table: ~10 min on 2 CPU cores
    torchrun --standalone --nproc_per_node 2 -m benchmarks.distributed --sampling  # FSDP's sampling

The step table runs `train.py --behavior verbosity` for a few steps three ways, on the same global
batch: one process with 2 threads, 2 processes with 1 thread each (DDP), and the same with --fsdp.
It reads the seconds of sampling and of the update, and the peak RSS of the largest rank, from each
run's log. On a 2-core CPU no speed-up is expected: the point is that the runs agree (the rewards
column) and what each rank holds in memory.

--sampling compares the two ways an FSDP2-sharded model can feed the sampler: gather every block
once around a whole `generate` call (distributed.full_weights, what train.py does), or let FSDP gather
each block in its forward and free it after, at every decoded token.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def step_table(args):
    ways = [("1 process x 2 threads", [sys.executable, "train.py"], {"OMP_NUM_THREADS": "2"}),
            ("2 processes x 1 thread (DDP)", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                             "--nproc_per_node", "2", "train.py"], {"OMP_NUM_THREADS": "1"}),
            ("2 processes x 1 thread (FSDP)", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                              "--nproc_per_node", "2", "train.py", "--fsdp"],
             {"OMP_NUM_THREADS": "1"})]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cmd, env in ways:
            out = os.path.join(tmp, str(len(rows)))
            flags = ["--behavior", "verbosity", "--steps", str(args.steps), "--eval-n", "2", "--out", out,
                     *args.train_args.split()]
            t0 = time.time()
            done = subprocess.run(cmd + flags, cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                                  text=True)
            if done.returncode:
                sys.exit(f"error: {name} failed:\n{done.stderr[-3000:]}")
            log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
            rows.append((name, log, time.time() - t0))
    ref = rows[0][1]
    sec = lambda log, key: sum(r[key] for r in log) / len(log)
    print(f"\n{args.steps} steps of train.py --behavior verbosity {args.train_args}".rstrip())
    print("| run | seconds sampling / step | seconds update / step | vs one process | peak RSS of a rank "
          "(GB) | rewards per step | same rewards as one process |")
    print("|---|---|---|---|---|---|---|")
    for name, log, _ in rows:
        total = sec(log, "seconds_sample") + sec(log, "seconds_update")
        ratio = total / (sec(ref, "seconds_sample") + sec(ref, "seconds_update"))
        same = all(abs(a["reward_mean"] - b["reward_mean"]) < 1e-6 for a, b in zip(log, ref))
        rewards = ", ".join(f"{r['reward_mean']:.3f}" for r in log)
        print(f"| {name} | {sec(log, 'seconds_sample'):.1f} | {sec(log, 'seconds_update'):.1f} | "
              f"{ratio:.2f}x | {max(r['peak_rss_gb'] for r in log):.2f} | {rewards} | "
              f"{'yes' if same else 'no'} |")


def sampling(args):
    """Under torchrun with --fsdp's sharding: generate with whole weights gathered once, against FSDP's
    gather per block per forward call."""
    import torch

    sys.path.insert(0, ROOT)
    import distributed
    from rollout import generate
    from data.load import load_model_and_tokenizer, user_prompt
    from train import Policy

    d, device = distributed.setup("cpu", True, 2)
    model, tok = load_model_and_tokenizer(None, device)
    policy = distributed.wrap(Policy(model), d)
    prompt = tok.chat(user_prompt("Tom has 4 apples and gets 3 more. How many apples does he have? Explain."))
    run = lambda: policy(generate, [prompt], n=args.rows, max_new_tokens=args.new_tokens,
                         temperature=1.0, seed=0)
    times = {"gathered once (full_weights)": [], "gathered per block per token": []}
    for _ in range(args.repeats):  # alternate the two, so drift on a shared host hits both alike
        for name in times:
            t0 = time.time()
            with torch.no_grad(), (distributed.full_weights(policy) if "once" in name else torch.no_grad()):
                r = run()
            times[name].append(time.time() - t0)
    tokens = int(r.completion_lens.sum())
    if d.master:
        print(f"\nFSDP2 over {d.world} processes, SmolLM2-135M fp32, {args.rows} rows x {args.new_tokens} "
              f"new tokens ({tokens} tokens in the last call); best of {args.repeats}")
        print("| sampling with | seconds | tokens/s | vs gathered once |")
        print("|---|---|---|---|")
        best = {k: min(v) for k, v in times.items()}
        for name, s in best.items():
            ratio = s / best["gathered once (full_weights)"]
            print(f"| {name} | {s:.2f} | {tokens / s:.0f} | {ratio:.2f}x |")
    distributed.teardown()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--train-args", default="", help="further train.py flags for every run")
    p.add_argument("--sampling", action="store_true", help="under torchrun: the FSDP sampling comparison")
    p.add_argument("--rows", type=int, default=12)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    sampling(args) if args.sampling else step_table(args)


if __name__ == "__main__":
    main()
