"""
VSPO's claim on a real model: VSPO, reward-shaped GRPO, guidance and distillation, side by side.

    python -m experiments.compare --algos vspo,grpo --seeds 0,1,2   # SmolLM2-135M, sparse verbosity
    python -m experiments.compare --seeds 0,1,2,3,4 --steps 40 --device cuda   # a GPU configuration

1. The alignment diagnostic, before any training: the behaviour rate and the accuracy of the
   model sampled at a range of steering intensities (steer.sweep at the vector's layer).
   VSPO can only distil what steering produces; experiments/bandit.py shows the advantage
   vanishing as steered samples stop showing the behaviour.
2. train.py with each --algo: the same initial model, seeds, data, rollout budget (prompts x
   group size x max tokens) and steps; the unsteered model evaluated on the held-out problems
   every --eval-every steps.
3. The tables (mean +- standard error over seeds at each evaluation; the behaviour-only
   zero-spread fraction per step) and a plot with a thin line per seed.

Each run lives in <out>/<algo>-seed<seed>: a finished run is read back, a killed one is
resumed, so re-running the command after an interruption continues where it stopped.
"""

import argparse
import json
import math
import os
import sys
import time

import torch

import train
from data.load import load_behavior, load_examples, load_model_and_tokenizer
from steer import load_or_extract_all, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALGOS = ("vspo", "grpo", "guided", "distill")


def alignment_diagnostic(args):
    """Behaviour rate and accuracy against steering intensity, on the held-out problems, before training."""
    model, tok = load_model_and_tokenizer(args.model, args.device)
    vectors, info, _ = load_or_extract_all(model, tok, args.behavior, args.model)
    layer, top = info["chosen_layer"], info["intensity"]
    intensities = [round(top * f, 4) for f in (0.5, 1.0, 1.5, 2.0)]
    behavior = load_behavior(args.behavior)
    # the problems (and robustness's hints) that the first seed's runs evaluate on: train.py's evaluation set
    examples = load_examples(args.eval_data, behavior, args.seeds[0] + 1)[:args.eval_n]
    t = args.train
    baseline, results = sweep(model, tok, behavior, vectors, examples, [layer], intensities,
                              t.max_new_tokens, t.temperature, args.seeds[0], t.steer_prompt == "yes")
    return {"layer": layer, "vector_intensity": top, "rows": [baseline, *results]}


def run(algo, seed, args):
    """One train.py run (resumed if it was interrupted, read back if finished) -> read_run's dict."""
    out = os.path.join(args.out, f"{algo}-seed{seed}")
    if not os.path.isfile(os.path.join(out, "eval_after.json")):
        argv = ["--behavior", args.behavior, "--algo", algo, "--seed", str(seed), "--out", out,
                "--steps", str(args.steps), "--eval-every", str(args.eval_every),
                "--eval-n", str(args.eval_n), "--eval-data", args.eval_data, "--device", args.device,
                *args.train_args.split()]
        if args.model:
            argv += ["--model", args.model]
        if os.path.isfile(os.path.join(out, "latest")):
            argv.append("--resume")
        t0 = time.time()
        train.main(argv)
        with open(os.path.join(out, "minutes"), "w") as f:
            f.write(f"{(time.time() - t0) / 60:.1f}")
    return read_run(out)


def read_run(out):
    """A finished run folder -> {"evals": [(step, metrics)], "log": [rows], "minutes": float}."""
    load = lambda name: json.load(open(os.path.join(out, name)))
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    evals = [(0, load("eval_before.json"))] + [(r["step"] + 1, r["eval"]) for r in log if "eval" in r]
    evals.append((log[-1]["step"] + 1, load("eval_after.json")))
    minutes_file = os.path.join(out, "minutes")
    minutes = float(open(minutes_file).read()) if os.path.isfile(minutes_file) else float("nan")
    return {"evals": evals, "log": log, "minutes": minutes}


def mean_se(values):
    """(mean, standard error of the mean) over seeds; the error is nan for a single seed."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def curve(runs, key):
    """Steps, and (mean, standard error) over seeds of one metric of the unsteered evaluations."""
    steps = [s for s, _ in runs[0]["evals"]]
    return steps, [mean_se([r["evals"][i][1][key] for r in runs]) for i in range(len(steps))]


def log_curve(runs, key):
    """Training steps, and (mean, standard error) over seeds of one field of the training log."""
    steps = [row["step"] for row in runs[0]["log"]]
    return steps, [mean_se([r["log"][i][key] for r in runs]) for i in range(len(steps))]


def fmt(m, se):
    return f"{m:.2f}" if math.isnan(se) else f"{m:.2f} ± {se:.2f}"


def print_tables(diag, results, args):
    print(f"\nalignment diagnostic (before training; layer {diag['layer']}, {args.eval_n} held-out problems, "
          f"T={args.train.temperature}, {args.train.max_new_tokens} new tokens):")
    print("| intensity | behaviour rate | accuracy | mean length | ended on its own "
          "| perplexity (unsteered) |")
    print("|---|---|---|---|---|---|")
    for r in diag["rows"]:
        print(f"| {r['intensity']:g} | {r['behavior']:.2f} | {r['accuracy']:.2f} | {r['length']:.0f} | "
              f"{r['stopped']:.2f} | {r['ppl']:.2f} |")
    print(f"\nunsteered model on {args.eval_n} held-out problems, mean ± standard error over seeds:")
    print("| algo | seeds | step | behaviour rate | accuracy | mean length |")
    print("|---|---|---|---|---|---|")
    for algo, runs in results.items():
        seeds = ",".join(str(r["seed"]) for r in runs)
        steps, beh = curve(runs, "behavior")
        _, acc = curve(runs, "accuracy")
        _, length = curve(runs, "length")
        for i, step in enumerate(steps):
            print(f"| {algo} | {seeds} | {step} | {fmt(*beh[i])} | {fmt(*acc[i])} | {length[i][0]:.0f} |")
    steps = [row["step"] for row in next(iter(results.values()))[0]["log"]]
    print("\nshare of groups whose behaviour scores have no spread (no behaviour signal) at each training "
          "step, mean over seeds:")
    print("| algo | " + " | ".join(str(s) for s in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for algo, runs in results.items():
        if all("behavior_zero_spread_frac" in row for r in runs for row in r["log"]):
            _, stats = log_curve(runs, "behavior_zero_spread_frac")
            print(f"| {algo} | " + " | ".join(f"{m:.2f}" for m, _ in stats) + " |")
    minutes = [r["minutes"] for runs in results.values() for r in runs]
    print(f"\n{len(minutes)} runs, {sum(m for m in minutes if not math.isnan(m)):.0f} minutes of training in "
          "all (each run's last invocation)")


def plot(diag, results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for ax, key, title in zip(axes, ("behavior", "accuracy", "length"),
                              ("behaviour rate (unsteered)", "accuracy (unsteered)", "mean length (tokens)")):
        for k, (algo, runs) in enumerate(results.items()):
            color = f"C{k}"
            for r in runs:  # a thin line per seed, the mean over seeds thick
                xs, ys = [s for s, _ in r["evals"]], [m[key] for _, m in r["evals"]]
                ax.plot(xs, ys, color=color, lw=0.6, alpha=0.5)
            steps, stats = curve(runs, key)
            ax.plot(steps, [m for m, _ in stats], "o-", color=color, lw=2,
                    label=f"{algo} ({len(runs)} seeds)")
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.legend()
    ax = axes[3]
    xs = [r["intensity"] for r in diag["rows"]]
    ax.plot(xs, [r["behavior"] for r in diag["rows"]], "o-", label="behaviour rate")
    ax.plot(xs, [r["accuracy"] for r in diag["rows"]], "s-", label="accuracy")
    ax.plot(xs, [r["stopped"] for r in diag["rows"]], "^--", label="ended on its own")
    ax.set_title(f"before training: steering at layer {diag['layer']}")
    ax.set_xlabel("intensity (x residual norm)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description="VSPO vs reward-shaped GRPO vs guidance on the same model, data "
                                            "and budget.")
    p.add_argument("--behavior", default="verbosity")
    p.add_argument("--model", default=None)
    p.add_argument("--algos", default=",".join(ALGOS))
    p.add_argument("--seeds", default="0",
                   help="comma-separated; on 2 CPU cores one run of the default takes about 10-20 minutes")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=4)
    p.add_argument("--eval-n", type=int, default=48)
    p.add_argument("--eval-data", default=os.path.join(ROOT, "data", "math", "test.jsonl"))
    p.add_argument("--train-args", default="",
                   help="further train.py flags, shared by every run, e.g. '--lr 1e-4 --max-new-tokens 256'")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "compare"))
    p.add_argument("--plot", default=None, help="where the plot goes (default: <out>/compare.png)")
    p.add_argument("--report", action="store_true",
                   help="train nothing: tabulate the finished runs among --algos x --seeds")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    # what every run will use
    args.train = train.parse_args(["--behavior", args.behavior, *args.train_args.split()])
    args.train.max_new_tokens = train.token_budget(args.train, load_behavior(args.behavior))
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    diag_path = os.path.join(args.out, "diagnostic.json")
    if os.path.isfile(diag_path):
        diag = json.load(open(diag_path))
    else:
        diag = alignment_diagnostic(args)
        json.dump(diag, open(diag_path, "w"))
    algos, runs = args.algos.split(","), {}
    for seed in args.seeds:  # seed by seed, so that an interrupted command has whole pairs to compare
        for algo in algos:
            finished = os.path.isfile(os.path.join(args.out, f"{algo}-seed{seed}", "eval_after.json"))
            if not args.report or finished:
                runs[algo, seed] = run(algo, seed, args)
    results = {algo: [dict(runs[algo, s], seed=s) for s in args.seeds if (algo, s) in runs] for algo in algos}
    results = {algo: seeds for algo, seeds in results.items() if seeds}
    if not results:
        sys.exit(f"error: no finished runs of {args.algos} with seeds {args.seeds} in {args.out}")
    print_tables(diag, results, args)
    print(f"\n{(time.time() - t0) / 60:.0f} min in this invocation")
    try:
        plot(diag, results, args.plot or os.path.join(args.out, "compare.png"))
    except ImportError:
        print("matplotlib is not installed: no plot")


if __name__ == "__main__":
    main()
