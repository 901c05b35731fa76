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

Each run lives in <out>/<algo>-seed<seed> (default out: runs/compare-<behavior>): a finished run
is read back, a killed one is resumed, so re-running the command after an interruption continues
where it stopped. One --out holds one comparison: a run, or diagnostic.json, recorded with other
settings than the command's is refused, never mixed in. --report trains and computes nothing.
"""

import argparse
import contextlib
import io
import json
import math
import os
import sys
import time

import torch
from safetensors import safe_open

import train
from data.load import load_behavior, load_examples, load_model_and_tokenizer
from rollout import parse_list
from steer import load_or_extract_all, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALGOS = ("vspo", "grpo", "guided", "distill")
METRICS = ("behavior", "accuracy", "length")
# A run's args.json is compared with this command's train.py arguments (the flags compare.py passes, and
# --train-args) in every field but these: they change where a run is kept or how its work is split, not
# what it computes (micro-batches split one sum, a checkpoint interval only moves where a resume starts,
# the device only the float rounding), so a run may be resumed or read back with other values of them.
UNCOMPARED = ("out", "device", "resume", "fsdp", "micro_batch", "checkpoint_every", "max_skipped_steps")
# diagnostic.json is reused only when these match: what the sweep's numbers depend on. The first seed (its
# sampling, robustness's hints) is recorded but not compared, so that adding seeds keeps the diagnostic.
DIAGNOSTIC_FIELDS = ("behavior", "model", "eval_data", "eval_n", "max_new_tokens", "temperature",
                     "steer_prompt")
PATH_FIELDS = ("model", "data", "eval_data")
DAMAGED = "the run folder is damaged: delete it to train the run again, or leave its seed out of --seeds"


def parse_args(argv=None):
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
    p.add_argument("--out", default=None,
                   help="the comparison's folder (default: runs/compare-<behavior>, one per behaviour)")
    p.add_argument("--plot", default=None, help="where the plot goes (default: <out>/compare.png)")
    p.add_argument("--report", action="store_true",
                   help="train and compute nothing: tabulate the finished runs among --algos x --seeds "
                        "(and diagnostic.json if there is one)")
    args = p.parse_args(argv)
    args.out = str(args.out or os.path.join(ROOT, "runs", f"compare-{args.behavior}"))
    args.model = args.model or None  # as train.py records the bundled model
    return args


# -----------------------------------------------------------------------------
# What a run is asked for, and what it recorded


def run_folder(args, algo, seed):
    return os.path.join(args.out, f"{algo}-seed{seed}")


def train_argv(algo, seed, args):
    """train.py's command line for one run; --train-args last."""
    argv = ["--behavior", args.behavior, "--algo", algo, "--seed", str(seed),
            "--out", run_folder(args, algo, seed), "--steps", str(args.steps),
            "--eval-every", str(args.eval_every), "--eval-n", str(args.eval_n),
            "--eval-data", args.eval_data, "--device", args.device]
    return argv + (["--model", args.model] if args.model else []) + args.train_args.split()


def requested(algo, seed, args):
    """train.py's arguments for one run, as its args.json records them (the token budget filled in)."""
    try:  # argparse prints its usage and exits; one line naming --train-args says more here
        with contextlib.redirect_stderr(io.StringIO()) as err:
            wanted = train.parse_args(train_argv(algo, seed, args))
    except SystemExit:
        why = (err.getvalue().strip().splitlines() or ["not train.py flags"])[-1].split("error: ", 1)[-1]
        raise ValueError(f"--train-args {args.train_args!r}: {why} (see python train.py --help)") from None
    own = {"behavior": args.behavior, "algo": algo, "seed": seed, "out": run_folder(args, algo, seed),
           "steps": args.steps, "eval_every": args.eval_every, "eval_n": args.eval_n,
           "eval_data": args.eval_data, "device": args.device, "model": args.model, "resume": False}
    for field, value in own.items():  # argparse lets the last value win, which would be --train-args's
        if getattr(wanted, field) != value:
            raise ValueError(f"--train-args {args.train_args!r} sets --{field.replace('_', '-')}, which "
                             "compare.py sets for every run; leave it out of --train-args")
    wanted.max_new_tokens = train.token_budget(wanted, load_behavior(args.behavior))
    return wanted


def check_request(args):
    """The flags, checked before anything is read, trained or written -> a one-line error naming the flag."""
    text = args.seeds
    args.seeds = parse_list(text, "--seeds", int)
    if len(set(args.seeds)) < len(args.seeds):
        raise ValueError(f"--seeds {text!r}: name each seed once")
    text, args.algos = args.algos, args.algos.split(",")
    if any(a not in ALGOS for a in args.algos) or len(set(args.algos)) < len(args.algos):
        raise ValueError(f"--algos {text!r}: expected some of {','.join(ALGOS)}, comma-separated, each once")
    load_behavior(args.behavior)  # an unknown behaviour fails here, naming the known ones
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file; pass a folder for the comparison")
    # what every run uses (the diagnostic samples as training does); ranges checked as train.py does
    # --dtype auto is resolved here, once, and passed on, so every run of the comparison computes alike;
    # --report reads runs of either dtype (each run's args.json says which)
    if not args.report and "--dtype" not in args.train_args.split():
        dtype, _ = train.compute_dtype(requested(args.algos[0], args.seeds[0], args), None)
        args.train_args = f"{args.train_args} --dtype {dtype}".strip()
    for algo in reversed(args.algos):  # every algorithm's flags, so none fails after others trained
        args.train = requested(algo, args.seeds[0], args)
        train.check_args(args.train)
    if args.train.coeffs:
        parse_list(args.train.coeffs, "--coeffs")


def same_path(a, b):
    """Whether two recorded paths name the same file. train.py records them as given, so a relative one is
    relative to where the run started: here, or the repository (docs/evidence's records)."""
    if a is None or b is None or not isinstance(a, str):
        return a == b
    return os.path.realpath(b) in (os.path.realpath(a), os.path.realpath(os.path.join(ROOT, a)))


def check_same(path, recorded, wanted, fields, what_to_do):
    """`recorded` (a file's settings) against `wanted` (this command's) -> a one-line error naming the
    first field that differs."""
    for field in fields:
        was, now = recorded[field], wanted[field]
        if not (same_path(was, now) if field in PATH_FIELDS else was == now):
            flag = f"--{field.replace('_', '-')}"
            show = lambda v: "(default)" if v is None else v
            raise ValueError(f"{path}: recorded with {flag} {show(was)}, but this command asks for {flag} "
                             f"{show(now)}; {what_to_do}")


def check_settings(out, wanted):
    """A recorded run's args.json against the run this command asks for, before it is read or resumed:
    another behaviour, model, step count, evaluation or training flag would be mixed into the
    comparison, or a killed run would continue under other flags than it started with."""
    path = os.path.join(out, "args.json")
    recorded = read_json(path, DAMAGED)
    # a field newer than the run's train.py: the run ran as its default does
    defaults = vars(train.parse_args(["--behavior", wanted.behavior]))
    auto = ("dtype",) if wanted.dtype == "auto" else ()  # --report: either dtype
    fields = [f for f in vars(wanted) if f not in UNCOMPARED + auto]
    check_same(path, {f: recorded.get(f, defaults[f]) for f in fields}, vars(wanted), fields,
               "pass the run's own settings to read or resume it, or another --out for a new comparison")


def read_json(path, what_to_do):
    """A JSON object from a file -> a one-line error naming the file when it is missing or damaged."""
    try:
        with open(path) as f:
            value = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: missing; {what_to_do}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({type(e).__name__}); {what_to_do}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: a JSON {type(value).__name__}, not an object; {what_to_do}")
    return value


def is_number(v, finite=True):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and (math.isfinite(v) or not finite)


def check_metrics(metrics, where):
    """One evaluation {behavior, accuracy, length}, each a number -> it, or an error naming where it is."""
    if not isinstance(metrics, dict):
        raise ValueError(f"{where}: an evaluation that is not an object; {DAMAGED}")
    for key in METRICS:
        if not is_number(metrics.get(key)):
            got = repr(metrics[key]) if key in metrics else "missing"
            raise ValueError(f"{where}: evaluation {key} is {got}, not a number; {DAMAGED}")
    return metrics


def final_problem(out):
    """None if <out>/final holds a complete model, else what is wrong with it. eval_after.json alone does
    not prove it: train.py once wrote it before final/, so a full disk could leave a run evaluated but its
    model torn."""
    final = os.path.join(out, "final")
    for name in ("model.safetensors", "config.json"):
        if not os.path.isfile(os.path.join(final, name)):
            return f"{name} is missing"
    try:
        with open(os.path.join(final, "config.json")) as f:
            if not isinstance(json.load(f), dict):
                return "config.json is not a JSON object"
        with safe_open(os.path.join(final, "model.safetensors"), "pt") as f:  # the header, and the length
            f.keys()                                                       # of the data it announces
    except Exception as e:  # a torn file raises whatever its reader (json or safetensors) raises
        return f"config.json or model.safetensors is torn ({type(e).__name__})"
    return None


def run_state(out):
    """What to do with a run folder: "new" (nothing to keep), "resume" (killed, or its final/ torn: the
    last checkpoint redoes it), "finished", or "records" (finished, its weights not kept: no final/ and
    no checkpoint, as in docs/evidence)."""
    has = lambda name: os.path.lexists(os.path.join(out, name))
    if not has("eval_after.json"):
        return "resume" if has("latest") else "new"
    if not has("final"):
        return "resume" if has("latest") else "records"
    problem = final_problem(out)
    if problem is None:
        return "finished"
    if has("latest"):
        return "resume"
    raise ValueError(f"{out}/final: {problem}, and there is no checkpoint to save it again from; delete "
                     f"{out} to train the run again, or pass another --out")


def read_minutes(out):
    """The minutes of the run's last invocation, nan if unknown. Only reported, so a damaged file is a
    warning, not a reason to refuse the tables."""
    path = os.path.join(out, "minutes")
    if not os.path.isfile(path):
        return float("nan")
    try:
        with open(path) as f:
            minutes = float(f.read())
        if math.isfinite(minutes) and minutes >= 0:
            return minutes
    except (OSError, UnicodeDecodeError, ValueError):
        pass
    print(f"warning: {path}: not a number of minutes; the run's time is counted as unknown", file=sys.stderr)
    return float("nan")


def read_run(out):
    """A finished run folder -> {"args": its args.json, "evals": [(step, metrics)], "log": [rows],
    "minutes": float}, each evaluation at its recorded step. A missing, torn or mistyped file is a
    one-line error naming it."""
    out = str(out)
    recorded = read_json(os.path.join(out, "args.json"), DAMAGED)
    steps = recorded.get("steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{out}/args.json: steps is {steps!r}, not a step count; {DAMAGED}")
    log_path = os.path.join(out, "log.jsonl")
    try:
        with open(log_path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise ValueError(f"{log_path}: missing; {DAMAGED}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{log_path}: unreadable ({type(e).__name__}); {DAMAGED}") from None
    log = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or row.get("step") != len(log):  # a finished run logs 0, 1, ...
            raise ValueError(f"{log_path}:{i}: not the log row of step {len(log)}; {DAMAGED}")
        if "eval" in row:
            check_metrics(row["eval"], f"{log_path}:{i}")
        if not is_number(row.get("behavior_zero_spread_frac", 0.0)):
            raise ValueError(f"{log_path}:{i}: behavior_zero_spread_frac is not a number; {DAMAGED}")
        log.append(row)
    if len(log) != steps:
        raise ValueError(f"{log_path}: {len(log)} rows for the {steps} steps of args.json (torn or cut "
                         f"short); {DAMAGED}")
    evals = {0: check_metrics(read_json(os.path.join(out, "eval_before.json"), DAMAGED),
                              f"{out}/eval_before.json")}
    evals.update((row["step"] + 1, row["eval"]) for row in log if "eval" in row)
    # the final evaluation, at the run's last step (with --steps 0 the same model as before, at step 0)
    evals[steps] = check_metrics(read_json(os.path.join(out, "eval_after.json"), DAMAGED),
                                 f"{out}/eval_after.json")
    return {"args": recorded, "evals": sorted(evals.items()), "log": log, "minutes": read_minutes(out)}


# -----------------------------------------------------------------------------
# The diagnostic


def diagnostic_settings(args):
    t = args.train
    return {"behavior": args.behavior, "model": args.model, "eval_data": args.eval_data,
            "eval_n": args.eval_n, "max_new_tokens": t.max_new_tokens, "temperature": t.temperature,
            "steer_prompt": t.steer_prompt, "seed": args.seeds[0]}


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
    return {"layer": layer, "vector_intensity": top, "rows": [baseline, *results],
            "settings": diagnostic_settings(args)}


def read_diagnostic(args):
    """<out>/diagnostic.json if it was computed with this command's settings, None if there is none.
    One computed with other settings is refused, never reused."""
    path = os.path.join(args.out, "diagnostic.json")
    if not os.path.lexists(path):
        return None
    what_to_do = "delete it to compute the diagnostic again, or pass another --out"
    diag = read_json(path, what_to_do)
    rows = diag.get("rows")
    keys = ("intensity", "behavior", "accuracy", "length", "stopped", "ppl")
    row_ok = lambda r: isinstance(r, dict) and all(is_number(r.get(k), finite=False) for k in keys)
    if not (isinstance(diag.get("layer"), int) and isinstance(rows, list) and rows
            and all(map(row_ok, rows))):
        raise ValueError(f"{path}: not a diagnostic (a layer, and rows of {', '.join(keys)}); {what_to_do}")
    if not isinstance(diag.get("settings"), dict):
        print(f"warning: {path} does not record its settings (an older compare.py), so they cannot be "
              "checked: shown as it is; delete it to compute it again", file=sys.stderr)
        return diag
    wanted = diagnostic_settings(args)
    recorded = {f: diag["settings"].get(f) for f in DIAGNOSTIC_FIELDS}
    check_same(path, recorded, wanted, DIAGNOSTIC_FIELDS, what_to_do)
    return diag


def write_json(path, value):
    """Written whole or not at all: a kill mid-write leaves no torn file to be read back later."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f)
    os.replace(path + ".tmp", path)


# -----------------------------------------------------------------------------
# Training


def train_run(algo, seed, resume, args):
    """One train.py run, started or resumed (its args.json already checked against this command)."""
    t0 = time.time()
    train.main(train_argv(algo, seed, args) + (["--resume"] if resume else []))
    with open(os.path.join(run_folder(args, algo, seed), "minutes"), "w") as f:
        f.write(f"{(time.time() - t0) / 60:.1f}")


# -----------------------------------------------------------------------------
# Tables and plot


def mean_se(values):
    """(mean, standard error of the mean) over seeds; the error is nan for a single seed."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def aligned(runs, points, key):
    """[(step, seeds, (mean, standard error))] at every step any run recorded, in order. Each seed's value
    is matched with the others' by its recorded step, never by its position in the list, and a step lists
    only the seeds that have it."""
    at = {}
    for r in runs:
        for step, row in points(r):
            if key in row:
                at.setdefault(step, []).append((r["seed"], row[key]))
    return [(step, [s for s, _ in vs], mean_se([v for _, v in vs])) for step, vs in sorted(at.items())]


def curve(runs, key):
    """One metric of the unsteered evaluations, over seeds, by step."""
    return aligned(runs, lambda r: r["evals"], key)


def log_curve(runs, key):
    """One field of the training log, over seeds, by step."""
    return aligned(runs, lambda r: [(row["step"], row) for row in r["log"]], key)


def fmt(m, se):
    return f"{m:.2f}" if math.isnan(se) else f"{m:.2f} ± {se:.2f}"


def print_tables(diag, results):
    if diag is None:
        print("\nno diagnostic.json: the alignment diagnostic is left out (run without --report to compute "
              "it)")
    else:
        s = diag.get("settings")
        settings = (f"{s['eval_n']} held-out problems, T={s['temperature']}, {s['max_new_tokens']} new tokens"
                    if s else "its settings not recorded")
        print(f"\nalignment diagnostic (before training; layer {diag['layer']}, {settings}):")
        print("| intensity | behaviour rate | accuracy | mean length | ended on its own "
              "| perplexity (unsteered) |")
        print("|---|---|---|---|---|---|")
        for r in diag["rows"]:
            print(f"| {r['intensity']:g} | {r['behavior']:.2f} | {r['accuracy']:.2f} | {r['length']:.0f} | "
                  f"{r['stopped']:.2f} | {r['ppl']:.2f} |")
    # the runs' own --eval-n (all equal: their settings were checked against one command)
    eval_n = " or ".join(sorted({str(r["args"].get("eval_n")) for runs in results.values() for r in runs}))
    print(f"\nunsteered model on {eval_n} held-out problems, mean ± standard error over seeds:")
    print("| algo | seeds | step | behaviour rate | accuracy | mean length |")
    print("|---|---|---|---|---|---|")
    for algo, runs in results.items():
        beh, acc, length = (curve(runs, key) for key in METRICS)
        for (step, seeds, b), (_, _, a), (_, _, n) in zip(beh, acc, length):
            print(f"| {algo} | {','.join(map(str, seeds))} | {step} | {fmt(*b)} | {fmt(*a)} | {n[0]:.0f} |")
    spread = {algo: {step: m for step, _, (m, _) in log_curve(runs, "behavior_zero_spread_frac")}
              for algo, runs in results.items()}
    steps = sorted({step for by_step in spread.values() for step in by_step})
    if steps:
        print("\nshare of groups whose behaviour scores have no spread (no behaviour signal) at each "
              "training step, mean over seeds:")
        print("| algo | " + " | ".join(str(s) for s in steps) + " |")
        print("|---|" + "---|" * len(steps))
        for algo, by_step in spread.items():
            if by_step:
                print(f"| {algo} | " + " | ".join(f"{by_step[s]:.2f}" if s in by_step else "-" for s in steps)
                      + " |")
    minutes = [r["minutes"] for runs in results.values() for r in runs]
    print(f"\n{len(minutes)} runs, {sum(m for m in minutes if not math.isnan(m)):.0f} minutes of training in "
          "all (each run's last invocation)")


def plot(diag, results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4 if diag else 3, figsize=(17 if diag else 13, 3.8))
    for ax, key, title in zip(axes, METRICS,
                              ("behaviour rate (unsteered)", "accuracy (unsteered)", "mean length (tokens)")):
        for k, (algo, runs) in enumerate(results.items()):
            color = f"C{k}"
            for r in runs:  # a thin line per seed, the mean over seeds thick
                xs, ys = [s for s, _ in r["evals"]], [m[key] for _, m in r["evals"]]
                ax.plot(xs, ys, color=color, lw=0.6, alpha=0.5)
            points = curve(runs, key)
            ax.plot([s for s, _, _ in points], [m for _, _, (m, _) in points], "o-", color=color, lw=2,
                    label=f"{algo} ({len(runs)} seeds)")
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.legend()
    if diag:
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
    args = parse_args(argv)
    t0 = time.time()
    # everything recorded is checked before anything is trained or written: a mismatch or a damaged file
    # stops the command at once, not after hours of training the other runs
    try:
        check_request(args)
        diag = read_diagnostic(args)
        runs, todo, unfinished, records = {}, [], [], []
        for seed in args.seeds:  # seed by seed, so that an interrupted command has whole pairs to compare
            for algo in args.algos:
                out = run_folder(args, algo, seed)
                state = run_state(out)
                name = os.path.basename(out)
                if args.report and state in ("new", "resume"):  # --report reads finished runs only
                    unfinished += [name] if state == "resume" else []
                    continue
                if state != "new":  # nothing is kept of a new run: train.py starts it afresh
                    check_settings(out, requested(algo, seed, args))
                if state in ("new", "resume"):
                    todo.append((algo, seed, state == "resume"))
                else:
                    runs[algo, seed] = read_run(out)
                    records += [name] if state == "records" else []
    except ValueError as e:
        sys.exit(f"error: {e}")
    if records:
        print(f"note: no final/ model in {', '.join(records)} of {args.out} (records whose weights were not "
              "kept): read from their files", file=sys.stderr)
    if unfinished:
        print(f"note: left out, not finished: {', '.join(unfinished)} (run without --report to resume them)",
              file=sys.stderr)
    if not args.report:
        os.makedirs(args.out, exist_ok=True)
        if diag is None:
            diag = alignment_diagnostic(args)
            write_json(os.path.join(args.out, "diagnostic.json"), diag)
        for algo, seed, resume in todo:
            train_run(algo, seed, resume, args)
            try:
                runs[algo, seed] = read_run(run_folder(args, algo, seed))
            except ValueError as e:
                sys.exit(f"error: {e}")
    results = {algo: [dict(runs[algo, s], seed=s) for s in args.seeds if (algo, s) in runs]
               for algo in args.algos}
    results = {algo: seeds for algo, seeds in results.items() if seeds}
    if not results:
        sys.exit(f"error: no finished runs of --algos {','.join(args.algos)} with --seeds "
                 f"{','.join(map(str, args.seeds))} in {args.out}; run without --report to train them")
    print_tables(diag, results)
    print(f"\n{(time.time() - t0) / 60:.0f} min in this invocation")
    try:
        plot(diag, results, args.plot or os.path.join(args.out, "compare.png"))
    except ImportError:
        print("matplotlib is not installed: no plot")


if __name__ == "__main__":
    main()
