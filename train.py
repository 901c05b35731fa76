"""
VSPO training, top to bottom: prompt -> rollouts -> rewards -> advantages -> loss -> update.

    python train.py --behavior verbosity                  # VSPO on the bundled SmolLM2
    python train.py --behavior verbosity --algo grpo      # reward-shaped GRPO: same reward, no steering
    python train.py --behavior verbosity --resume         # continue a killed run from its last checkpoint

One step:
  1. take P prompts; choose one steering intensity per rollout (vspo.intensity_schedule);
  2. sample G rollouts per prompt, each row steered by its own intensity (rollout.generate);
  3. score each rollout: accuracy + lambda * behaviour (rewards.composite);
  4. normalise rewards within each group of G (vspo.composite_advantages);
  5. recompute the rollouts' log-probs under the *unsteered* policy and take the clipped policy
     loss (vspo.policy_loss); one optimizer step.
--algo grpo uses intensity 0 for every rollout; --algo guided samples with the behaviour's
instruction in the prompt (no steering) and trains on the plain prompt; --algo distill (teacher-trace
distillation) samples the same way from the frozen initial model, keeps the traces that earn the
behaviour, and trains the plain-prompt policy on them by maximum likelihood.
"""

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import sys
import time

import torch
from tqdm import tqdm

import distributed
import rewards
import vspo
from data.problems import DataError
from rollout import NonFiniteLogits, check_finite, completion_logprobs, generate, left_pad, parse_list
from data.load import chat_prompt, load_behavior, load_examples, load_model_and_tokenizer, sampling_budget
from model import bf16_speedup
from steer import load_or_extract

ROOT = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a model to show a behaviour without steering (VSPO).")
    p.add_argument("--behavior", required=True,
                   help="verbosity, expertise, confidence, robustness (data/behaviors/*.json)")
    p.add_argument("--algo", default="vspo", choices=["vspo", "grpo", "guided", "distill"])
    p.add_argument("--model", default=None,
                   help="checkpoint folder (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--data", default=os.path.join(ROOT, "data", "math", "train.jsonl"),
                   help="GSM8K-style JSONL")
    p.add_argument("--eval-data", default=os.path.join(ROOT, "data", "math", "test.jsonl"))
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--group-size", type=int, default=6)
    p.add_argument("--coeffs", default=None,
                   help="steering intensities of a group, e.g. 0,0.1,0.2 (default: 0, half, the vector's "
                        "intensity)")
    p.add_argument("--schedule", default="stratified", choices=vspo.SCHEDULES)
    p.add_argument("--layer", type=int, default=None,
                   help="steering layer (default: the vector's chosen layer)")
    p.add_argument("--steer-prompt", default="yes", choices=["yes", "no"],
                   help="steer prompt positions too, or generated ones only")
    p.add_argument("--old-logprobs", default="unsteered", choices=["unsteered", "steered"],
                   help="ratio against the unsteered policy (self-distillation) or with a truncated "
                        "importance weight for steering")
    p.add_argument("--lam", type=float, default=1.0,
                   help="behaviour weight in the reward: accuracy + lam * behaviour")
    p.add_argument("--reward-normalization", default="sum", choices=vspo.NORMALIZATIONS,
                   help="sum: normalise accuracy + lam * behaviour in each group; separate: normalise each "
                        "within the group, then combine with lam (GDPO)")
    p.add_argument("--behavior-gate", default="none", choices=["none", "correct"],
                   help="correct: the behaviour counts only in correct answers (a change of what is "
                        "rewarded, not of how the learner uses it)")
    p.add_argument("--overlong", default="none", choices=vspo.OVERLONG,
                   help="rollouts cut off at the budget (DAPO): mask leaves them out of the loss; soft adds "
                        "a penalty over the last --overlong-window tokens before the budget")
    p.add_argument("--overlong-window", type=int, default=64,
                   help="tokens before the budget over which --overlong soft's penalty falls to -1")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--beta", type=float, default=0.0,
                   help="KL coefficient to the initial model (0: no reference copy)")
    p.add_argument("--aggregation", default="fixed", choices=vspo.AGGREGATIONS,
                   help="loss averaging; fixed (Dr. GRPO) because seq_mean's length bias drove answers into "
                        "the token budget (docs/history.md)")
    p.add_argument("--advantage", default="std", choices=["std", "none"])
    p.add_argument("--updates-per-batch", type=int, default=1,
                   help="optimizer steps on each batch of rollouts (GRPO's mu)")
    p.add_argument("--micro-batch", type=int, default=8, help="rows per forward/backward")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="token budget per rollout (default: the behaviour's max_new_tokens, else 256)")
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--train-layers", type=int, default=10,
                   help="train only the last K blocks and the final norm (0: all parameters)")
    p.add_argument("--eval-n", type=int, default=48, help="held-out problems for the before/after evaluation")
    p.add_argument("--eval-every", type=int, default=0,
                   help="also evaluate the unsteered model every K steps (0: before and after only)")
    p.add_argument("--checkpoint-every", type=int, default=5)
    p.add_argument("--max-skipped-steps", type=int, default=3,
                   help="stop after this many steps in a row whose loss or gradient norm is not finite (each "
                        "is skipped: no optimizer step)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="run folder (default: runs/<behavior>-<algo>-seed<seed>)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype; weights and AdamW state stay fp32. bfloat16: the sampler multiplies "
                        "with bf16 copies of the weights, the update runs under autocast. auto: bfloat16 "
                        "where this machine's bf16 matmul is clearly faster (docs/speed.md), else float32; "
                        "a resumed run keeps its own")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard parameters, gradients and optimizer state (FSDP2)")
    return p.parse_args(argv)


def check_args(args):
    """Ranges argparse cannot express, checked before anything runs or is written."""
    check_finite(args)
    for flag, low in (("steps", 0), ("prompts_per_step", 1), ("group_size", 2), ("updates_per_batch", 1),
                      ("micro_batch", 1),
                      ("max_new_tokens", 1), ("train_layers", 0), ("eval_n", 1), ("eval_every", 0),
                      ("checkpoint_every", 1), ("max_skipped_steps", 1), ("overlong_window", 1)):
        if getattr(args, flag) < low:
            why = " (advantages compare the rollouts of a group)" if flag == "group_size" else ""
            raise ValueError(f"--{flag.replace('_', '-')} must be at least {low}{why}")
    if args.overlong == "soft" and args.overlong_window > args.max_new_tokens:
        raise ValueError(f"--overlong-window {args.overlong_window} is longer than the token budget "
                         f"{args.max_new_tokens}: the penalty would reach answers of any length")
    if not args.temperature > 0:
        raise ValueError("--temperature must be above 0: the loss scores completions under the tempered "
                         "distribution")
    if not args.lr > 0 or args.beta < 0:
        raise ValueError("--lr must be above 0 and --beta at least 0")
    if args.algo == "distill" and (args.beta > 0 or args.old_logprobs == "steered"):
        raise ValueError("--algo distill is maximum likelihood on the teacher's traces: it has no KL term "
                         "(--beta) and no importance ratio (--old-logprobs steered); drop those flags")


def compute_dtype(args, out):
    """--dtype auto -> "float32" or "bfloat16", and why. A resumed run keeps the dtype its args.json
    recorded. A new one takes bf16 on a GPU that supports it, and on a CPU whose bf16 matmul is over
    1.5x its fp32 one: measured once per machine and kept (machine_bf16_speedup), since a timing taken
    while other work runs could otherwise give two runs on one machine different numerics."""
    on_cpu = torch.device(args.device).type == "cpu"
    if args.dtype == "bfloat16" and on_cpu and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise ValueError("--dtype bfloat16: this CPU's oneDNN has no bf16 matmul; use --dtype float32")
    if args.dtype != "auto":
        return args.dtype, "--dtype"
    if args.resume:
        try:
            with open(os.path.join(out, "args.json")) as f:
                recorded = json.load(f)["dtype"]
            if recorded in ("float32", "bfloat16"):
                return recorded, "the run's args.json"
        except (OSError, ValueError, KeyError, TypeError):
            pass
        raise ValueError(f"{out}/args.json: no dtype recorded, so --dtype auto cannot keep the run's own; "
                         "pass --dtype float32 or bfloat16 (float32 for a run of an older train.py)")
    if not on_cpu:  # native bf16 only: emulated bf16 (before Ampere) is slower than fp32
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return ("bfloat16" if native else "float32"), "auto: the GPU's native bf16 support"
    speedup, where = machine_bf16_speedup()
    return ("bfloat16" if speedup > 1.5 else "float32"), f"auto: bf16 matmul {speedup:.2f}x fp32 ({where})"


PROBE_PAUSE = 1.0  # seconds between the bf16 probe's measurements


def machine_bf16_speedup():
    """model.bf16_speedup, measured on this machine's first run and read back by every later one from
    $XDG_CACHE_HOME/vspo (default ~/.cache/vspo), keyed by the CPU, its bf16 instructions, torch's
    version and its threads. The best of three measurements a second apart: other work on the machine
    only lowers the ratio. -> (speedup, where it came from). Delete the file to measure again."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    features = [name for name, has in (("avx512_bf16", torch.cpu._is_avx512_bf16_supported()),
                                       ("amx", torch.cpu._is_amx_tile_supported())) if has]
    key = f"{cpu} [{' '.join(features) or 'no native bf16'}] | torch {torch.__version__} | " \
          f"{torch.get_num_threads()} threads"
    path = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vspo",
                        "bf16_speedup.json")
    try:
        with open(path) as f:
            known = json.load(f)
        if isinstance(known.get(key), (int, float)):
            return float(known[key]), f"measured on this machine, kept in {path}"
    except (OSError, ValueError, AttributeError):
        known = {}
    speedup = bf16_speedup()
    for _ in range(2):
        time.sleep(PROBE_PAUSE)
        speedup = max(speedup, bf16_speedup())
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        known = known if isinstance(known, dict) else {}
        tmp = f"{path}.{os.getpid()}.tmp"  # two first runs at once each write their own
        with open(tmp, "w") as f:
            json.dump({**known, key: speedup}, f, indent=1)
        os.replace(tmp, path)
        return speedup, f"measured now, kept in {path}"
    except OSError:  # a read-only home: measured for this run only
        return speedup, "measured now"


def token_budget(args, behavior):
    """--max-new-tokens, else the behaviour's own budget (a length bar needs room above it), else 256."""
    return sampling_budget(behavior, args.max_new_tokens)


def check_prompt_lengths(examples, path, prompt_of, args, model, budget):
    """A problem too long for the model fails here, naming it, rather than in the middle of training."""
    for i, ex in enumerate(examples, 1):
        n = len(prompt_of(ex))
        if n + args.max_new_tokens > model.config.max_seq_len:
            raise ValueError(f"{path}: problem {i} ({ex['question'][:30]!r}...) makes a prompt of {n} "
                             f"tokens, which with {budget} exceeds the model's "
                             f"{model.config.max_seq_len} positions; shorten or drop it")


# -----------------------------------------------------------------------------
# Data


def batch_indices(n_examples, prompts_per_step, step, seed):
    """The examples of one step: a fresh seeded permutation each epoch, so a resumed run sees the
    same data."""
    per_epoch = n_examples // prompts_per_step
    epoch, k = divmod(step, per_epoch)
    order = list(range(n_examples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[k * prompts_per_step:(k + 1) * prompts_per_step]


def with_prompts(r, prompts):
    """The same completions behind different prompts (--algo guided trains on the plain prompt)."""
    P = r.prompt_width
    tokens, _, mask = left_pad(prompts, r.tokens.device)
    Q = tokens.size(1)
    cat = lambda left, right: torch.cat([left, right[:, P:]], 1)
    return dataclasses.replace(r, tokens=cat(tokens, r.tokens), prompt_lens=mask.sum(1), prompt_width=Q,
                               completion_mask=cat(torch.zeros_like(mask), r.completion_mask),
                               logprobs=cat(torch.zeros(tokens.shape, device=tokens.device), r.logprobs))


# -----------------------------------------------------------------------------
# Scoring and evaluation


@dataclasses.dataclass
class Sampling:
    """How the sampler computes: its matmul dtype (rollout.generate's `dtype`) and the context around it."""
    dtype: torch.dtype
    context: object  # a function returning a context manager


class StopRun(Exception):
    """A failure that ends the run with one line (a reward out of range, steps that keep failing, a
    write that failed); the last checkpoint stays, and --resume continues from it."""


def score(tok, r, examples, behavior, lam):
    """Decode each rollout and score it -> (rewards, accuracies, behaviour scores), each (N,)."""
    try:
        out = [rewards.composite("", rewards.Completion(*c), ex, behavior["name"], lam,
                                 **behavior.get("reward", {}))
               for c, ex in zip(r.completions(tok), examples)]
    except ValueError as e:  # a behaviour score that is not a number in [0, 1]
        raise StopRun(str(e)) from None
    return torch.tensor(out).T  # (3, N)


EVAL_BATCH = 32  # held-out problems per sampler call


def evaluate(policy, model, tok, examples, behavior, args, sampling):
    """The unsteered model on held-out problems, sampled at the training temperature with a fixed seed.
    Under torchrun each rank samples every W-th problem, under the problem's index as its row id, and
    the results are gathered: the same samples as one process."""
    t0 = time.time()
    model.eval()
    d = distributed
    mine = list(range(len(examples)))[args.dist.rank::args.dist.world]
    results = []
    # FSDP gathers the weights once for the whole loop: ranks may hold different numbers of batches, and a
    # gather per batch would leave one rank's all-gather unmatched
    with torch.no_grad(), sampling.context(), d.full_weights(policy):
        for i in range(0, len(mine), EVAL_BATCH):
            ids = mine[i:i + EVAL_BATCH]
            chunk = [examples[k] for k in ids]
            r = policy(generate, [chat_prompt(tok, ex, behavior) for ex in chunk],
                       max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       stop_ids=tok.stop_ids, seed=args.seed + 12345, row_ids=ids, vocab_size=tok.vocab_size,
                       dtype=sampling.dtype)
            _, acc, beh = score(tok, r, chunk, behavior, 1.0)
            results += zip(acc.tolist(), beh.tolist(), r.completion_lens.tolist())
    results = [x for part in d.gather(results) for x in part]
    n = len(results)
    return {"accuracy": sum(a for a, _, _ in results) / n, "behavior": sum(b for _, b, _ in results) / n,
            "length": sum(length for _, _, length in results) / n, "seconds": time.time() - t0}


# -----------------------------------------------------------------------------
# Checkpoints: written atomically, so a run killed at any moment resumes from the last complete one.
# In the layout of one process (weights in the HF layout, optimizer state keyed by parameter name),
# so that a run saved with N processes, with or without --fsdp, resumes with M.


def remove(path):
    """Delete a file, folder or link at `path` (a link itself, never what it points to)."""
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def check_writable(out):
    """Make the run folder and write a file in it, before anything costly runs. -> whether the folder
    was made here (a run that then fails to start removes it again)."""
    made = not os.path.exists(out)
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".writable-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror or e}); pass a writable "
                         "folder") from None
    return made


def written(what, write):
    """write(), with a failed write (a full disk) as StopRun naming `what`."""
    try:
        write()
    except OSError as e:
        raise StopRun(f"writing {what} failed ({e.strerror or e})") from None


def append_log(log_path, row, d):
    """Rank 0 appends the step's row and syncs it to disk before anything else is written (the next
    checkpoint): a checkpoint never covers a step whose row could still be lost. A failed write is the
    same error on every rank. Numbers that are not finite are written as null (JSON has no NaN)."""
    row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}

    def write():
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    distributed.on_master(lambda: written(log_path, write), d, errors=(StopRun,), raise_as=StopRun)


def start_run_folder(out, args, before):
    """Rank 0 writes what a new run starts with: its arguments, the evaluation before training, an
    empty log."""
    with open(os.path.join(out, "args.json"), "w") as f:
        json.dump({k: v for k, v in vars(args).items() if k != "dist"}, f, indent=1)
    with open(os.path.join(out, "eval_before.json"), "w") as f:
        json.dump(before, f)
    open(os.path.join(out, "log.jsonl"), "w").close()


def resume_log(out, start):
    """Rank 0's part of a resume: read eval_before.json, and rewrite log.jsonl with only its rows before
    step `start` (the resumed run writes the later ones again, identically). -> eval_before.json."""
    before, lines, missing = read_resume_state(out, start)
    log_path = os.path.join(out, "log.jsonl")
    with open(log_path, "w") as f:
        f.writelines(lines)
    if missing:
        print(f"warning: {log_path} has no row for step(s) {', '.join(map(str, missing))} (lost before the "
              "checkpoint was written); the resumed log will lack them", file=sys.stderr)
    return before


def read_resume_state(out, start):
    """-> (eval_before.json, the log's lines before step `start`, the steps among them with no row)."""
    try:
        with open(os.path.join(out, "eval_before.json")) as f:
            before = json.load(f)
        for key in ("accuracy", "behavior", "length"):
            if not isinstance(before[key], (int, float)):
                raise TypeError(key)
        lines, missing = read_log(os.path.join(out, "log.jsonl"), start)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise ValueError(f"{out}: eval_before.json or log.jsonl is missing or damaged, so the run cannot "
                         "resume; start anew with another --out") from None
    return before, lines, missing


def weights_are_sound(policy, model, probe, d):
    """Finite weights whose logits on a probe prompt are finite too: what a checkpoint must hold before
    it replaces the last one. The logits catch weights that are finite but diverged (an update at
    lr 1e30 leaves weights near 1e30: they pass a finite check, and every matmul overflows)."""
    with torch.no_grad(), distributed.full_weights(policy):
        finite_logits = bool(torch.isfinite(model(probe)).all())
        sound = finite_logits and all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return distributed.all_sum(float(not sound), d) == 0  # the same answer on every rank


def last_checkpoint(out):
    """What a run that stops keeps, and what to do next, for its message."""
    try:
        with open(os.path.join(out, "latest")) as f:
            return f"{os.path.join(out, f.read().strip()[:40])} is kept: fix the cause, then --resume"
    except OSError:
        return (f"no checkpoint was written yet: fix the cause, then start again (delete {out} or pass "
                "another --out)")


def save_checkpoint(out, step, model, optimizer, d, state=None):
    """Rank 0 writes checkpoint-<step>, then points `latest` at it, then deletes the older ones; a write
    that fails (a full disk) is the same one-line error on every rank, and keeps the older one."""
    # under FSDP, all ranks gather
    model_state, optimizer_state = distributed.state_dicts(model, optimizer, d)
    write = lambda: write_checkpoint(out, step, model, model_state, optimizer_state, state or {})
    distributed.on_master(lambda: written(f"checkpoint-{step}", write), d, errors=(StopRun,),
                          raise_as=StopRun)


def write_checkpoint(out, step, model, model_state, optimizer_state, state):
    # temporaries are made anew, never followed: a link left in the run folder cannot redirect a write
    tmp = os.path.join(out, f".checkpoint-{step}.tmp")
    remove(tmp)
    os.mkdir(tmp)
    model.save_pretrained(tmp, model_state)
    torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump({**state, "step": step}, f)  # and the adaptive schedule's intensities, if any
    final = os.path.join(out, f"checkpoint-{step}")
    remove(final)
    os.replace(tmp, final)
    latest_tmp = os.path.join(out, "latest.tmp")
    remove(latest_tmp)
    with os.fdopen(os.open(latest_tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644),
                   "w") as f:
        f.write(f"checkpoint-{step}")
    os.replace(latest_tmp, os.path.join(out, "latest"))
    # only now, with the new one complete and `latest` naming it, the older ones go
    for name in os.listdir(out):
        if name.startswith("checkpoint-") and name != f"checkpoint-{step}":
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)


def load_checkpoint(out, model):
    """Load the last checkpoint's weights into `model` (before it is wrapped for DDP or FSDP)
    -> (the step to continue from, the saved optimizer state, its path, state.json)."""
    latest = os.path.join(out, "latest")
    with open(latest, errors="replace") as f:
        name = f.read().strip()
    path = os.path.join(out, name)
    # `latest` names a checkpoint folder of this run, nothing else (not ../elsewhere, not an absolute path)
    if not re.fullmatch(r"checkpoint-\d+", name) or os.path.islink(path) or not os.path.isdir(path):
        raise ValueError(f"{latest}: names {name[:60]!r}, not a checkpoint-N folder of this run; start anew "
                         "with another --out")
    from model import CheckpointError, Transformer

    try:
        saved = Transformer.from_pretrained(path, device=next(model.parameters()).device)
        model.load_state_dict(saved.state_dict())
    except CheckpointError as e:
        raise ValueError(str(e)) from None
    except RuntimeError:  # another architecture or size than --model
        raise ValueError(f"{path}: a checkpoint of another model than --model {model.source}; resume with "
                         "the run's own --model, or start anew with another --out") from None
    try:  # a damaged file raises whatever its first bad byte triggers in the reader
        state = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True)  # never unpickle code
        with open(os.path.join(path, "state.json")) as f:
            saved = json.load(f)
        step = saved["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise TypeError(f"step {step!r}")
    except Exception as e:
        raise ValueError(f"{path}: optimizer.pt or state.json is damaged ({type(e).__name__}), so the run "
                         "cannot resume from it; start anew with another --out") from None
    return step, state, path, saved


def resumed_levels(saved, levels, path):
    """The adaptive schedule's intensities as the checkpoint saved them (so that a resumed run samples
    what the uninterrupted one would)."""
    got = saved.get("levels")
    if not (isinstance(got, list) and len(got) == len(levels) and all(isinstance(x, (int, float))
                                                                       and math.isfinite(x) for x in got)):
        raise ValueError(f"{path}/state.json: no intensities of --schedule adaptive ({len(levels)} numbers); "
                         "resume with the run's own --schedule and --coeffs")
    return [float(x) for x in got]


def read_log(log_path, start):
    """The log rows before step `start`, and the steps among them that have no row. A torn last line (a
    kill or a full disk mid-write) is dropped, as rows past the checkpoint are: the resumed run writes
    them again. A bad line elsewhere is an error. Rows are synced before each checkpoint, so a step
    goes missing only if the disk lost a synced write; the caller says which."""
    lines = open(log_path, errors="replace").read().split("\n")
    rows, seen = [], set()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            if i >= len(lines) - 2:  # the last line (the text may or may not end with a newline)
                break
            raise ValueError(f"{log_path}:{i + 1}: not a log row; the run folder is damaged") from None
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{log_path}:{i + 1}: step {step!r} is not a step number; the run folder is "
                             "damaged: start anew with another --out")
        if step < start:
            rows.append(line + "\n")
            seen.add(step)
    return rows, sorted(set(range(start)) - seen)


def load_optimizer(model, optimizer, state, path, d):
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    try:
        if set(state["state"]) != trained:
            raise ValueError
        distributed.load_optimizer_state(model, optimizer, state, d)
    except (RuntimeError, KeyError, TypeError, ValueError):  # other trained tensors, or of other sizes
        raise ValueError(f"{path}/optimizer.pt: saved for other trained parameters (another --train-layers, "
                         "or an older version of train.py); resume with the flags of the run, or start anew "
                         "with another --out") from None


def plot(log_path, png_path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [json.loads(l) for l in open(log_path)]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.5))
    for a, key, title in zip(ax, ("reward_mean", "behavior_mean", "length_mean"),
                             ("reward", "behaviour rate (rollouts)", "length (tokens)")):
        a.plot([r["step"] for r in rows], [r[key] for r in rows])
        a.set_title(title)
        a.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    return True


# -----------------------------------------------------------------------------


class Policy(torch.nn.Module):
    """Runs a function of the model (the sampler, or the completions' log-probs) as this module's
    forward. DDP prepares its gradient all-reduce, and FSDP2 gathers weights, in the forward of the
    module they wrap, so both the sampler and the loss's forward pass run through this one:
    policy(generate, prompts, ...) is generate(model, prompts, ...)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def main(argv=None):
    args = parse_args(argv)
    out = args.out or os.path.join(ROOT, "runs", f"{args.behavior}-{args.algo}-seed{args.seed}")
    made_out, d = False, distributed.Dist()
    try:
        behavior = load_behavior(args.behavior)
        budget = (f"--max-new-tokens {args.max_new_tokens}" if args.max_new_tokens is not None else
                  f"max_new_tokens {behavior.get('max_new_tokens', 256)} of the behaviour {args.behavior}")
        args.max_new_tokens = token_budget(args, behavior)
        check_args(args)
        if behavior.get("reward", {}).get("min_tokens", 0) > args.max_new_tokens:  # verbosity's bar
            raise ValueError(f"the behaviour {args.behavior} asks for min_tokens "
                             f"{behavior['reward']['min_tokens']}, more than {budget} allows: it could never "
                             "be shown; raise --max-new-tokens")
        given_coeffs = parse_list(args.coeffs, "--coeffs") if args.coeffs else None
        if behavior["name"] not in rewards.REWARDS:
            raise ValueError(f"data/behaviors/{args.behavior}.json has no reward function in rewards.py")
        train_examples = load_examples(args.data, behavior, args.seed)
        eval_examples = load_examples(args.eval_data, behavior, args.seed + 1)[:args.eval_n]
        if len(train_examples) < args.prompts_per_step:
            raise ValueError(f"{args.data}: {len(train_examples)} problems, fewer than --prompts-per-step "
                             f"{args.prompts_per_step}")
        if os.path.exists(out) and not os.path.isdir(out):
            raise ValueError(f"--out {out} is a file; pass a folder for the run")
        if args.resume and not os.path.isfile(os.path.join(out, "latest")):
            raise ValueError(f"--resume: no checkpoint in {out}")
        if not args.resume and os.path.isfile(os.path.join(out, "latest")):
            raise ValueError(f"{out} already holds a run; pass --resume to continue it or --out for a new "
                             "one")
        for name in ("latest", "log.jsonl", "args.json", "eval_before.json", "eval_after.json", "final",
                     "curves.png"):
            if os.path.islink(os.path.join(out, name)):  # writing it would write wherever it points
                raise ValueError(f"{os.path.join(out, name)} is a link; a run folder holds its own files "
                                 "only: remove it or pass another --out")
        # under torchrun: one process per device, all of them running this same loop on their share
        d, args.device = distributed.setup(args.device, args.fsdp, args.prompts_per_step)
        args.dist = d
        # before the model loads: an unwritable --out would otherwise fail only after the first evaluation
        made_out = distributed.on_master(lambda: check_writable(out), d)
        # decided once, by rank 0, so that every rank computes in the same dtype
        args.dtype, args.dtype_chosen_by = distributed.on_master(lambda: compute_dtype(args, out), d)
        if d.local_rank != 0:  # the first process of each machine prepares the bundled model alone
            distributed.barrier()
        model, tok = load_model_and_tokenizer(args.model, args.device)
        if d.local_rank == 0:
            distributed.barrier()
        # guided sampling and distill's teacher add the behaviour's instruction to the prompt
        instruction = behavior["positive"] if args.algo in ("guided", "distill") else None
        check_prompt_lengths(train_examples, args.data,
                             lambda ex: chat_prompt(tok, ex, behavior, instruction), args, model, budget)
        check_prompt_lengths(eval_examples, args.eval_data, lambda ex: chat_prompt(tok, ex, behavior), args,
                             model, budget)
        vector = layer = None
        if args.algo == "vspo":  # extracted (or read) once, by rank 0, and sent to the others
            sv = distributed.on_master(
                lambda: load_or_extract(model, tok, args.behavior, args.model, layer=args.layer), d)
            vector, layer = sv.scaled_direction().to(args.device), sv.layer
            coeffs = given_coeffs or [0.0, sv.intensity / 2, sv.intensity]
        # --schedule adaptive moves these after every step (vspo.adapt_intensities); the others keep them
        levels = list(coeffs) if args.algo == "vspo" else []
    except (ValueError, OSError, DataError) as e:
        if made_out and d.master and not os.listdir(out):  # no run started: leave no empty folder behind
            os.rmdir(out)
        sys.exit(f"error: {e}")
    torch.manual_seed(args.seed)
    use_bf16 = args.dtype == "bfloat16"
    # the update: autocast's bf16 matmuls over fp32 master weights (mixed precision)
    autocast = lambda: torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16,
                                      enabled=use_bf16)
    # sampling: on a CPU the sampler's own bf16 copies of the weights (rollout.generate's dtype), which
    # autocast would recast at every decode step; on a GPU, autocast
    on_cpu = torch.device(args.device).type == "cpu"
    sampling = Sampling(dtype=torch.bfloat16 if use_bf16 and on_cpu else torch.float32,
                        context=contextlib.nullcontext if on_cpu else autocast)

    # which parameters learn: all, or the last K blocks (+ final norm) to save compute on a CPU
    if args.train_layers:
        for p in model.parameters():
            p.requires_grad_(False)
        for block in model.layers[-args.train_layers:]:
            block.requires_grad_(True)
        model.norm.requires_grad_(True)
    # the frozen initial policy
    ref_model = copy.deepcopy(model).requires_grad_(False) if args.beta > 0 else None
    # distill's teacher: the initial model, frozen, sampled as the policy is (a full copy, also under FSDP)
    teacher = Policy(copy.deepcopy(model).requires_grad_(False)) if args.algo == "distill" else None
    # a prompt to check, before each checkpoint, that the weights still give finite logits
    probe = torch.tensor([chat_prompt(tok, train_examples[0], behavior)], device=args.device)
    start = 0
    try:
        if args.resume:
            start, optimizer_state, checkpoint, saved = load_checkpoint(out, model)
            levels = resumed_levels(saved, levels, checkpoint) if args.schedule == "adaptive" else levels
    except ValueError as e:
        sys.exit(f"error: {e}")
    policy = distributed.wrap(Policy(model), d)  # DDP, FSDP2, or the policy itself
    # after wrapping: FSDP2 replaces them by shards
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    try:
        if args.resume:
            load_optimizer(model, optimizer, optimizer_state, checkpoint, d)
            # rank 0 reads what was logged; the rows past the checkpoint are dropped, since the resumed
            # run writes them again, identically
            before = distributed.on_master(lambda: resume_log(out, start), d)
    except ValueError as e:
        sys.exit(f"error: {e}")
    log_path = os.path.join(out, "log.jsonl")

    if d.master:
        print(f"compute dtype: {args.dtype} ({args.dtype_chosen_by}); weights and AdamW state in float32")
    at = "the evaluation before training"  # where the run is, for a message that stops it
    step, skipped_in_a_row = start, 0
    try:
        if start == 0:
            before = evaluate(policy, model, tok, eval_examples, behavior, args, sampling)
            distributed.on_master(lambda: start_run_folder(out, args, before), d, raise_as=StopRun)
        if d.master:
            print(f"before training (unsteered, {len(eval_examples)} held-out problems): accuracy "
                  f"{before['accuracy']:.2f}, behaviour {before['behavior']:.2f}, length "
                  f"{before['length']:.0f}")

        G, P, W = args.group_size, args.prompts_per_step, d.world
        bar = tqdm(range(start, args.steps), initial=start, total=args.steps,
                   desc=f"{args.algo} {args.behavior}", disable=not d.master)
        for step in bar:
            at = f"step {step}"
            t0 = time.time()
            model.eval()
            # 1. prompts and the intensity of each rollout; this process takes prompts
            # [rank P/W, (rank+1) P/W)
            batch = [train_examples[i] for i in batch_indices(len(train_examples), P, step, args.seed)]
            if args.algo == "vspo":
                g = torch.Generator().manual_seed(args.seed * 7919 + step)
                all_coeffs = torch.cat([vspo.intensity_schedule(args.schedule, levels, G, step, args.steps, g)
                                        for _ in batch])
            else:
                all_coeffs = torch.zeros(P * G)
            mine = range(d.rank * P // W, (d.rank + 1) * P // W)
            batch = [batch[i] for i in mine]
            # global row ids: what each row's random numbers depend on
            rows = range(mine.start * G, mine.stop * G)
            row_coeffs = all_coeffs[mine.start * G:mine.stop * G]
            plain = [chat_prompt(tok, ex, behavior) for ex in batch]
            # guided and distill sample with the behaviour's instruction in the prompt
            sample_prompts = plain
            if instruction:
                sample_prompts = [chat_prompt(tok, ex, behavior, instruction) for ex in batch]
            # 2. rollouts, each row at its own intensity (no_grad: DDP then expects no backward)
            with torch.no_grad(), sampling.context(), distributed.full_weights(policy):
                r = (teacher or policy)(generate, sample_prompts, n=G, max_new_tokens=args.max_new_tokens,
                                        temperature=args.temperature, stop_ids=tok.stop_ids,
                                        seed=args.seed * 1_000_003 + step, vector=vector, layer=layer,
                                        coeffs=row_coeffs, steer_prompt=args.steer_prompt == "yes",
                                        row_ids=rows, vocab_size=tok.vocab_size, dtype=sampling.dtype)
            if instruction:  # trained on the plain prompt
                r = with_prompts(r, [p for p in plain for _ in range(G)])
            t_sample = time.time() - t0
            # 3. rewards
            row_examples = [ex for ex in batch for _ in range(G)]
            _, acc, beh = score(tok, r, row_examples, behavior, args.lam)
            # the reward's parts: accuracy, the behaviour (only in correct answers with --behavior-gate
            # correct), DAPO's length penalty with --overlong soft; reward = their weighted sum
            shown = beh * acc if args.behavior_gate == "correct" else beh
            components, lams = [acc, shown], [1.0, args.lam]
            if args.overlong == "soft":
                components.append(vspo.overlong_penalty(r.completion_lens.cpu(), args.max_new_tokens,
                                                        args.overlong_window))
                lams.append(1.0)
            components = torch.stack(components)  # (K, N)
            reward = (components * torch.tensor(lams)[:, None]).sum(0)
            # 4. group-relative advantages over all G rollouts of a prompt, whatever their intensity
            advantages, magnitudes, zero_spread = vspo.composite_advantages(
                components, lams, G, args.reward_normalization, scale=args.advantage)
            _, behavior_zero_spread = vspo.group_advantages(beh, G)  # groups with no behaviour signal
            advantages = advantages.to(args.device)
            keep = (beh >= 0.5).to(args.device)  # distill: the traces that earn the behaviour
            # 5. the update, on the unsteered policy. The normaliser is the whole batch's (summed over
            # ranks); DDP and FSDP average gradients over ranks, so each rank's loss is scaled by W to
            # give their sum
            t1 = time.time()
            model.train()
            mask = r.completion_mask[:, r.prompt_width:]
            if args.overlong == "mask":  # DAPO's overlong filtering: rows the budget cut off leave the loss
                cut_off = torch.tensor([why == "length" for why in r.finish_reasons], device=mask.device)
                mask = mask & ~cut_off[:, None]
            normalizer = distributed.all_sum(vspo.loss_normalizer(mask, args.aggregation,
                                                                  args.max_new_tokens), d)
            N = len(rows)
            # rows sorted by length into micro-batches, each computed at its own width (rollout.trimmed):
            # the loss is a sum over rows with one normaliser, so the grouping changes nothing but speed
            order = sorted(range(N), key=lambda i: int(r.completion_lens[i]))
            micro = [order[i:i + args.micro_batch] for i in range(0, N, args.micro_batch)]
            # the rows the sampler drew as the learner scores them (unsteered, plain prompt): their
            # log-probs differ only by numerics (bf16 sampler, other kernels), logged as a mismatch
            same_policy = (r.coeffs == 0) if not instruction else torch.zeros(N, dtype=torch.bool)
            old, ref, weights = {}, {}, {}
            with torch.no_grad(), autocast():
                for mb in micro:
                    if args.algo != "distill" and (args.updates_per_batch > 1
                                                   or args.old_logprobs == "steered"):
                        old[mb[0]] = policy(completion_logprobs, r, mb, args.temperature)[0]
                    if ref_model is not None:
                        ref[mb[0]] = completion_logprobs(ref_model, r, mb, args.temperature)[0]
                    if args.old_logprobs == "steered":
                        sampler = r.logprobs[mb, r.prompt_width:]
                        weights[mb[0]] = vspo.truncated_is_weights(old[mb[0]], sampler, mask[mb])
            # sums over the completion tokens of every update, so the logged means are token means of
            # the whole batch, however it is split into micro-batches and ranks
            sums = {"loss": 0.0, "clip_frac": 0.0, "kl": 0.0, "entropy": 0.0, "tokens": 0.0,
                    "mismatch": 0.0, "mismatch_tokens": 0.0}
            skipped, mismatch_max = False, 0.0
            for u in range(args.updates_per_batch):
                optimizer.zero_grad(set_to_none=True)
                update_loss = 0.0
                for mb in micro:
                    with autocast(), distributed.gradient_sync(policy, last=mb is micro[-1]):
                        logp, ent = policy(completion_logprobs, r, mb, args.temperature)
                        # maximum likelihood on the teacher's traces that earn the behaviour
                        if args.algo == "distill":
                            loss = vspo.sft_loss(logp, keep[mb], mask[mb], normalizer, args.aggregation)
                            s = {"clip_frac": 0, "kl": 0}
                        else:
                            loss, s = vspo.policy_loss(logp, old.get(mb[0], logp.detach()), advantages[mb],
                                                       mask[mb], normalizer, args.aggregation,
                                                       ref_logprobs=ref.get(mb[0]), beta=args.beta,
                                                       is_weights=weights.get(mb[0]))
                        (loss * W).backward()
                    tokens = mask[mb].sum().item()
                    if u == 0:  # sampler against learner, |log p| apart per token
                        gap = (logp.detach() - r.logprobs[mb, r.prompt_width:]).abs()
                        gap = gap[mask[mb] & same_policy[mb, None].to(mask.device)]
                        sums["mismatch"] += gap.sum().item()
                        sums["mismatch_tokens"] += gap.numel()
                        mismatch_max = max(mismatch_max, gap.max().item() if gap.numel() else 0.0)
                    update_loss += loss.item()
                    sums["clip_frac"] += s["clip_frac"] * tokens
                    sums["kl"] += s["kl"] * tokens
                    sums["entropy"] += (ent * mask[mb]).sum().item()
                    sums["tokens"] += tokens
                sums["loss"] += update_loss / args.updates_per_batch
                grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
                if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
                    grad_norm = grad_norm.full_tensor()
                # A non-finite loss or gradient would write NaN into the weights and AdamW's moments:
                # skip the optimizer step instead. Both numbers are global (the loss summed over ranks,
                # the norm of the reduced gradients), so every rank takes the same decision.
                total_loss = distributed.all_sum(update_loss, d)
                finite = math.isfinite(total_loss) and math.isfinite(grad_norm.item())
                if not finite:
                    skipped = True
                    optimizer.zero_grad(set_to_none=True)
                    break
                optimizer.step()
            t_update = time.time() - t1
            skipped_in_a_row = skipped_in_a_row + 1 if skipped else 0
            applied = u if skipped else args.updates_per_batch  # updates before the non-finite one

            # the log row, from every rank's rows in global order: the row one process would write
            local = (reward, acc, beh, r.completion_lens.float(), row_coeffs, r.finish_reasons, zero_spread,
                     t_sample, t_update, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                     behavior_zero_spread)
            parts = distributed.gather([x.cpu() if torch.is_tensor(x) else x for x in local])
            reward, acc, beh, lengths, all_coeffs = (torch.cat([p[i] for p in parts]) for i in range(5))
            finish_reasons = [why for p in parts for why in p[5]]
            sums = {k: distributed.all_sum(v, d) for k, v in sums.items()}
            mismatch_tokens, mismatch = sums.pop("mismatch_tokens"), sums.pop("mismatch")
            mismatch = {"logprob_mismatch_mean": mismatch / mismatch_tokens if mismatch_tokens else None,
                        "logprob_mismatch_max": max(distributed.gather(mismatch_max))
                        if mismatch_tokens else None}
            n_tokens = max(1.0, sums.pop("tokens"))
            stats = {"loss": sums.pop("loss"), **{k: v / n_tokens for k, v in sums.items()}}
            cut = torch.tensor([why == "length" for why in finish_reasons], dtype=torch.float32)
            levels_seen = sorted(set(all_coeffs.tolist()))
            by_coeff = lambda x: {f"{c:g}": x[all_coeffs == c].mean().item() for c in levels_seen}
            magnitudes = [distributed.all_sum(m, d) for m in magnitudes.tolist()]
            names = ("accuracy", "behavior", "length")[:len(magnitudes)]
            share = {n: m / sum(magnitudes) if sum(magnitudes) else 0.0 for n, m in zip(names, magnitudes)}
            row = {"step": step, "reward_mean": reward.mean().item(), "reward_std": reward.std().item(),
                   "accuracy_mean": acc.mean().item(), "behavior_mean": beh.mean().item(),
                   "behavior_by_coeff": by_coeff(beh), "accuracy_by_coeff": by_coeff(acc),
                   "truncated_by_coeff": by_coeff(cut), "advantage_share": share,
                   "zero_spread_frac": sum(p[6] for p in parts) / P,
                   "behavior_zero_spread_frac": sum(p[10] for p in parts) / P,
                   "length_mean": lengths.mean().item(), "length_max": lengths.max().item(),
                   "truncated_frac": cut.mean().item(),
                   **stats, **mismatch, "grad_norm": grad_norm.item(), "skipped": skipped,
                   "skipped_in_a_row": skipped_in_a_row,
                   "dtype": args.dtype,
                   "seconds_sample": max(p[7] for p in parts), "seconds_update": max(p[8] for p in parts),
                   "peak_rss_gb": max(p[9] for p in parts)}
            if args.algo == "vspo":  # the intensities this step sampled at; adaptive moves them for the next
                row["intensities"] = levels
                if args.schedule == "adaptive":
                    level_of = torch.arange(P * G) % G % len(levels)  # stratified: row j of a group, j mod K
                    at_level = lambda x: [x[level_of == k].mean().item() for k in range(len(levels))]
                    levels = vspo.adapt_intensities(levels, coeffs, at_level(beh), at_level(cut))
            if args.algo == "distill":  # a step that keeps no trace has no loss: say so
                row["kept_traces"] = int((beh >= 0.5).sum())
                if row["kept_traces"] == 0 and d.master:
                    tqdm.write(f"warning: step {step} kept no teacher trace: no loss, only AdamW's momentum "
                               "moved the weights", file=sys.stderr)
            if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
                row["eval"] = evaluate(policy, model, tok, eval_examples, behavior, args, sampling)
            append_log(log_path, row, d)
            bar.set_postfix(reward=f"{row['reward_mean']:.2f}", behavior=f"{row['behavior_mean']:.2f}",
                            length=f"{row['length_mean']:.0f}")
            if skipped and d.master:
                kept = ("the weights are unchanged" if applied == 0 else
                        f"its first {applied} update(s) were applied, the rest of the batch dropped")
                tqdm.write(f"warning: step {step} skipped: the loss ({stats['loss']:.3g}) or the gradient "
                           f"norm ({grad_norm.item():.3g}) is not finite; {kept}", file=sys.stderr)
            if skipped_in_a_row >= args.max_skipped_steps:
                raise StopRun(f"{skipped_in_a_row} steps in a row (to step {step}) had a loss or gradient "
                              "norm that is not finite and were skipped (--max-skipped-steps "
                              f"{args.max_skipped_steps})")
            if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps:
                if not weights_are_sound(policy, model, probe, d):
                    raise StopRun("the update diverged: the weights give non-finite logits, so they are not "
                                  "checkpointed")
                t2 = time.time()
                save_checkpoint(out, step + 1, model, optimizer, d, {"levels": levels})
                if d.master:  # the row is written: the time goes to the run's console
                    tqdm.write(f"checkpoint-{step + 1}: {time.time() - t2:.1f} s", file=sys.stderr)

        at = "the evaluation after training"
        after = evaluate(policy, model, tok, eval_examples, behavior, args, sampling)
        # under FSDP, all ranks gather the shards
        model_state, _ = distributed.state_dicts(model, optimizer, d)
        if d.master:  # eval_after.json last: a run folder that has it has its whole final model
            model.save_pretrained(os.path.join(out, "final"), model_state)
            with open(os.path.join(out, "eval_after.json"), "w") as f:
                json.dump(after, f)
    except NonFiniteLogits as e:
        advice = "check --model" if at.endswith("before training") else "lower --lr"
        sys.exit(f"error: model produced non-finite logits at {at}, row {e.row}: its weights hold NaN or inf "
                 f"or have diverged ({advice}); {last_checkpoint(out)}")
    except (StopRun, OSError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else e
        where = f" ({e.filename})" if isinstance(e, OSError) and e.filename else ""
        sys.exit(f"error: {at}: {why}{where}; {last_checkpoint(out)}")
    if d.master and args.algo == "distill" and args.steps > 0:
        kept = [json.loads(line).get("kept_traces") for line in open(log_path)]
        if kept and all(k == 0 for k in kept):  # rows of an older train.py, without the count, are unknown
            print(f"warning: no step kept a teacher trace (none scored >= 0.5 on {args.behavior}), so the "
                  "policy was never trained; a looser behaviour bar or another instruction may help",
                  file=sys.stderr)
    if d.master:
        print(f"\n| unsteered, {len(eval_examples)} held-out problems | accuracy | behaviour rate | mean "
              "length |")
        print("|---|---|---|---|")
        for name, m in (("before", before), ("after", after)):
            print(f"| {name} | {m['accuracy']:.2f} | {m['behavior']:.2f} | {m['length']:.0f} |")
        plotted = plot(log_path, os.path.join(out, "curves.png"))
        print(f"\nsaved {out}/final (model), log.jsonl"
              + (", curves.png" if plotted else " (pip install matplotlib for curves.png)"))
    distributed.teardown()


if __name__ == "__main__":
    main()
