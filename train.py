"""
VSPO training, top to bottom: prompt -> rollouts -> rewards -> advantages -> loss -> update.

    python train.py --behavior verbosity                  # VSPO on the bundled SmolLM2
    python train.py --behavior verbosity --algo grpo      # reward-shaped GRPO: same reward, no steering
    python train.py --behavior verbosity --resume         # continue a killed run from its last checkpoint

One step:
  1. take P prompts; choose one steering intensity per rollout (vspo.intensity_schedule);
  2. sample G rollouts per prompt, each row steered by its own intensity (rollout.generate);
  3. score each rollout: accuracy + lambda * behaviour (rewards.composite);
  4. normalise rewards within each group of G (vspo.group_advantages);
  5. recompute the rollouts' log-probs under the *unsteered* policy and take the clipped policy
     loss (vspo.policy_loss); one optimizer step.
--algo grpo uses intensity 0 for every rollout; --algo guided samples with the behaviour's
instruction in the prompt (no steering) and trains on the plain prompt.
"""

import argparse
import copy
import dataclasses
import json
import os
import random
import resource
import shutil
import sys
import time

import torch
from tqdm import tqdm

import rewards
import vspo
from data.problems import DataError
from rollout import check_finite, completion_logprobs, generate, left_pad, parse_list
from steer import chat_prompt, load_behavior, load_examples, load_model_and_tokenizer, load_or_extract

ROOT = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a model to show a behaviour without steering (VSPO).")
    p.add_argument("--behavior", required=True, help="verbosity, expertise, confidence, robustness (data/behaviors/*.json)")
    p.add_argument("--algo", default="vspo", choices=["vspo", "grpo", "guided"])
    p.add_argument("--model", default=None, help="checkpoint folder (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--data", default=os.path.join(ROOT, "data", "math", "train.jsonl"), help="GSM8K-style JSONL")
    p.add_argument("--eval-data", default=os.path.join(ROOT, "data", "math", "test.jsonl"))
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--group-size", type=int, default=6)
    p.add_argument("--coeffs", default=None, help="steering intensities of a group, e.g. 0,0.1,0.2 (default: 0, half, the vector's intensity)")
    p.add_argument("--schedule", default="stratified", choices=vspo.SCHEDULES)
    p.add_argument("--layer", type=int, default=None, help="steering layer (default: the vector's chosen layer)")
    p.add_argument("--steer-prompt", default="yes", choices=["yes", "no"], help="steer prompt positions too, or generated ones only")
    p.add_argument("--old-logprobs", default="unsteered", choices=["unsteered", "steered"],
                   help="ratio against the unsteered policy (self-distillation) or with a truncated importance weight for steering")
    p.add_argument("--lam", type=float, default=1.0, help="behaviour weight in the reward: accuracy + lam * behaviour")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient to the initial model (0: no reference copy)")
    p.add_argument("--aggregation", default="fixed", choices=vspo.AGGREGATIONS,
                   help="loss averaging; fixed (Dr. GRPO) because seq_mean's length bias drove answers into the token budget (README)")
    p.add_argument("--advantage", default="std", choices=["std", "none"])
    p.add_argument("--updates-per-batch", type=int, default=1, help="optimizer steps on each batch of rollouts (GRPO's mu)")
    p.add_argument("--micro-batch", type=int, default=8, help="rows per forward/backward")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--train-layers", type=int, default=10, help="train only the last K blocks and the final norm (0: all parameters)")
    p.add_argument("--eval-n", type=int, default=48, help="held-out problems for the before/after evaluation")
    p.add_argument("--eval-every", type=int, default=0, help="also evaluate the unsteered model every K steps (0: before and after only)")
    p.add_argument("--checkpoint-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="run folder (default: runs/<behavior>-<algo>-seed<seed>)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="autocast dtype (weights stay fp32)")
    p.add_argument("--resume", action="store_true")
    return p.parse_args(argv)


def check_args(args):
    """Ranges argparse cannot express, checked before anything runs or is written."""
    check_finite(args)
    for flag, low in (("steps", 0), ("prompts_per_step", 1), ("group_size", 2), ("updates_per_batch", 1), ("micro_batch", 1),
                      ("max_new_tokens", 1), ("train_layers", 0), ("eval_n", 1), ("eval_every", 0), ("checkpoint_every", 1)):
        if getattr(args, flag) < low:
            why = " (advantages compare the rollouts of a group)" if flag == "group_size" else ""
            raise ValueError(f"--{flag.replace('_', '-')} must be at least {low}{why}")
    if not args.temperature > 0:
        raise ValueError("--temperature must be above 0: the loss scores completions under the tempered distribution")
    if not args.lr > 0 or args.beta < 0:
        raise ValueError("--lr must be above 0 and --beta at least 0")


def check_prompt_lengths(examples, path, prompt_of, args, model):
    """A problem too long for the model fails here, naming it, rather than in the middle of training."""
    for i, ex in enumerate(examples, 1):
        n = len(prompt_of(ex))
        if n + args.max_new_tokens > model.config.max_seq_len:
            raise ValueError(f"{path}: problem {i} ({ex['question'][:30]!r}...) makes a prompt of {n} tokens, which with --max-new-tokens "
                             f"{args.max_new_tokens} exceeds the model's {model.config.max_seq_len} positions; shorten or drop it")


# -----------------------------------------------------------------------------
# Data


def batch_indices(n_examples, prompts_per_step, step, seed):
    """The examples of one step: a fresh seeded permutation each epoch, so a resumed run sees the same data."""
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


def score(tok, r, examples, behavior, lam):
    """Decode each rollout and score it -> (rewards, accuracies, behaviour scores), each (N,)."""
    out = [rewards.composite("", rewards.Completion(*c), ex, behavior["name"], lam, **behavior.get("reward", {}))
           for c, ex in zip(r.completions(tok), examples)]
    return torch.tensor(out).T  # (3, N)


def evaluate(model, tok, examples, behavior, args, autocast):
    """The unsteered model on held-out problems, sampled at the training temperature with a fixed seed."""
    model.eval()
    accs, behs, lens = [], [], []
    for i in range(0, len(examples), 32):
        chunk = examples[i:i + 32]
        prompts = [chat_prompt(tok, ex, behavior) for ex in chunk]
        with autocast():
            r = generate(model, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         stop_ids=tok.stop_ids, seed=args.seed + 12345 + i)
        _, acc, beh = score(tok, r, chunk, behavior, 1.0)
        accs += acc.tolist()
        behs += beh.tolist()
        lens += r.completion_lens.tolist()
    n = len(examples)
    return {"accuracy": sum(accs) / n, "behavior": sum(behs) / n, "length": sum(lens) / n}


# -----------------------------------------------------------------------------
# Checkpoints: written atomically, so a run killed at any moment resumes from the last complete one


def save_checkpoint(out, step, model, optimizer):
    tmp = os.path.join(out, f".checkpoint-{step}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump({"step": step}, f)
    final = os.path.join(out, f"checkpoint-{step}")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    with open(os.path.join(out, "latest.tmp"), "w") as f:
        f.write(f"checkpoint-{step}")
    os.replace(os.path.join(out, "latest.tmp"), os.path.join(out, "latest"))
    for name in os.listdir(out):  # keep only the newest
        if name.startswith("checkpoint-") and name != f"checkpoint-{step}":
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)


def load_checkpoint(out, model, optimizer):
    """-> the step to continue from (0 when there is no checkpoint)."""
    latest = os.path.join(out, "latest")
    if not os.path.isfile(latest):
        return 0
    with open(latest) as f:
        path = os.path.join(out, f.read().strip())
    from model import Transformer

    saved = Transformer.from_pretrained(path, device=next(model.parameters()).device)
    model.load_state_dict(saved.state_dict())
    try:  # a damaged file raises whatever its first bad byte triggers in the reader
        state = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True)  # never unpickle code
        with open(os.path.join(path, "state.json")) as f:
            step = json.load(f)["step"]
    except Exception as e:
        raise ValueError(f"{path}: optimizer.pt or state.json is damaged ({type(e).__name__}), so the run cannot "
                         f"resume from it; start anew with another --out") from None
    try:
        optimizer.load_state_dict(state)
    except ValueError:  # another number or size of trained tensors
        raise ValueError(f"{path}/optimizer.pt: saved for other trained parameters (another --train-layers, or an "
                         f"older version of model.py); resume with the flags of the run, or start anew with another --out") from None
    return step


def plot(log_path, png_path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [json.loads(l) for l in open(log_path)]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.5))
    for a, key, title in zip(ax, ("reward_mean", "behavior_mean", "length_mean"), ("reward", "behaviour rate (rollouts)", "length (tokens)")):
        a.plot([r["step"] for r in rows], [r[key] for r in rows])
        a.set_title(title)
        a.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    return True


# -----------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    out = args.out or os.path.join(ROOT, "runs", f"{args.behavior}-{args.algo}-seed{args.seed}")
    try:
        check_args(args)
        given_coeffs = parse_list(args.coeffs, "--coeffs") if args.coeffs else None
        behavior = load_behavior(args.behavior)
        if behavior["name"] not in rewards.REWARDS:
            raise ValueError(f"data/behaviors/{args.behavior}.json has no reward function in rewards.py")
        train_examples = load_examples(args.data, behavior, args.seed)
        eval_examples = load_examples(args.eval_data, behavior, args.seed + 1)[:args.eval_n]
        if len(train_examples) < args.prompts_per_step:
            raise ValueError(f"{args.data}: {len(train_examples)} problems, fewer than --prompts-per-step {args.prompts_per_step}")
        model, tok = load_model_and_tokenizer(args.model, args.device)
        instruction = behavior["positive"] if args.algo == "guided" else None  # guided sampling adds it to the prompt
        check_prompt_lengths(train_examples, args.data, lambda ex: chat_prompt(tok, ex, behavior, instruction), args, model)
        check_prompt_lengths(eval_examples, args.eval_data, lambda ex: chat_prompt(tok, ex, behavior), args, model)
        vector = layer = None
        if args.algo == "vspo":
            sv = load_or_extract(model, tok, args.behavior, args.model, layer=args.layer)
            vector, layer = sv.scaled_direction().to(args.device), sv.layer
            coeffs = given_coeffs or [0.0, sv.intensity / 2, sv.intensity]
    except (ValueError, OSError, DataError) as e:
        sys.exit(f"error: {e}")
    if os.path.exists(out) and not os.path.isdir(out):
        sys.exit(f"error: --out {out} is a file; pass a folder for the run")
    if args.resume and not os.path.isfile(os.path.join(out, "latest")):
        sys.exit(f"error: --resume: no checkpoint in {out}")
    if not args.resume and os.path.isfile(os.path.join(out, "latest")):
        sys.exit(f"error: {out} already holds a run; pass --resume to continue it or --out for a new one")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(args.seed)
    use_bf16 = args.dtype == "bfloat16"
    autocast = lambda: torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16, enabled=use_bf16)

    # which parameters learn: all, or the last K blocks (+ final norm) to save compute on a CPU
    if args.train_layers:
        for p in model.parameters():
            p.requires_grad_(False)
        for block in model.layers[-args.train_layers:]:
            block.requires_grad_(True)
        model.norm.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ref_model = copy.deepcopy(model).requires_grad_(False) if args.beta > 0 else None  # the frozen initial policy
    try:
        start = load_checkpoint(out, model, optimizer) if args.resume else 0
    except ValueError as e:
        sys.exit(f"error: {e}")
    log_path = os.path.join(out, "log.jsonl")
    if start == 0:
        with open(os.path.join(out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
        before = evaluate(model, tok, eval_examples, behavior, args, autocast)
        with open(os.path.join(out, "eval_before.json"), "w") as f:
            json.dump(before, f)
        open(log_path, "w").close()
    else:  # drop log lines past the checkpoint: the resumed run writes them again, identically
        with open(os.path.join(out, "eval_before.json")) as f:
            before = json.load(f)
        lines = [l for l in open(log_path) if json.loads(l)["step"] < start]
        with open(log_path, "w") as f:
            f.writelines(lines)
    print(f"before training (unsteered, {len(eval_examples)} held-out problems): accuracy {before['accuracy']:.2f}, "
          f"behaviour {before['behavior']:.2f}, length {before['length']:.0f}")

    G, P = args.group_size, args.prompts_per_step
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=f"{args.algo} {args.behavior}")
    for step in bar:
        t0 = time.time()
        model.eval()
        # 1. prompts and the intensity of each rollout
        batch = [train_examples[i] for i in batch_indices(len(train_examples), P, step, args.seed)]
        plain = [chat_prompt(tok, ex, behavior) for ex in batch]
        sample_prompts = [chat_prompt(tok, ex, behavior, instruction) for ex in batch] if instruction else plain
        if args.algo == "vspo":
            g = torch.Generator().manual_seed(args.seed * 7919 + step)
            row_coeffs = torch.cat([vspo.intensity_schedule(args.schedule, coeffs, G, step, args.steps, g) for _ in batch])
        else:
            row_coeffs = torch.zeros(P * G)
        # 2. rollouts, each row at its own intensity
        with autocast():
            r = generate(model, sample_prompts, n=G, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         stop_ids=tok.stop_ids, seed=args.seed * 1_000_003 + step, vector=vector, layer=layer,
                         coeffs=row_coeffs, steer_prompt=args.steer_prompt == "yes")
        if args.algo == "guided":
            r = with_prompts(r, [p for p in plain for _ in range(G)])
        t_sample = time.time() - t0
        # 3. rewards
        row_examples = [ex for ex in batch for _ in range(G)]
        reward, acc, beh = score(tok, r, row_examples, behavior, args.lam)
        # 4. group-relative advantages over all G rollouts of a prompt, whatever their intensity
        advantages, zero_spread = vspo.group_advantages(reward, G, scale=args.advantage)
        advantages = advantages.to(args.device)
        # 5. the update, on the unsteered policy
        t1 = time.time()
        model.train()
        mask = r.completion_mask[:, r.prompt_width:]
        normalizer = vspo.loss_normalizer(mask, args.aggregation, args.max_new_tokens)
        micro = [list(range(i, min(i + args.micro_batch, P * G))) for i in range(0, P * G, args.micro_batch)]
        old, ref, weights = {}, {}, {}
        with torch.no_grad(), autocast():
            for rows in micro:
                if args.updates_per_batch > 1 or args.old_logprobs == "steered":
                    old[rows[0]] = completion_logprobs(model, r, rows, args.temperature)[0]
                if ref_model is not None:
                    ref[rows[0]] = completion_logprobs(ref_model, r, rows, args.temperature)[0]
                if args.old_logprobs == "steered":
                    sampler = r.logprobs[rows, r.prompt_width:]
                    weights[rows[0]] = vspo.truncated_is_weights(old[rows[0]], sampler, mask[rows])
        stats = {"loss": 0.0, "clip_frac": 0.0, "kl": 0.0, "entropy": 0.0}
        for _ in range(args.updates_per_batch):
            optimizer.zero_grad(set_to_none=True)
            for rows in micro:
                with autocast():
                    logp, ent = completion_logprobs(model, r, rows, args.temperature)
                    loss, s = vspo.policy_loss(logp, old.get(rows[0], logp.detach()), advantages[rows], mask[rows], normalizer,
                                               args.aggregation, ref_logprobs=ref.get(rows[0]), beta=args.beta,
                                               is_weights=weights.get(rows[0]))
                loss.backward()
                share = len(rows) / (P * G) / args.updates_per_batch
                stats["loss"] += loss.item() / args.updates_per_batch
                stats["clip_frac"] += s["clip_frac"] * share
                stats["kl"] += s["kl"] * share
                stats["entropy"] += (ent * mask[rows]).sum().item() / max(1, mask[rows].sum().item()) * share
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0).item()
            optimizer.step()
        t_update = time.time() - t1

        lengths = r.completion_lens.float()
        by_coeff = {f"{c:g}": beh[row_coeffs == c].mean().item() for c in sorted(set(row_coeffs.tolist()))}
        row = {"step": step, "reward_mean": reward.mean().item(), "reward_std": reward.std().item(),
               "accuracy_mean": acc.mean().item(), "behavior_mean": beh.mean().item(), "behavior_by_coeff": by_coeff,
               "zero_spread_frac": zero_spread / P, "length_mean": lengths.mean().item(), "length_max": lengths.max().item(),
               "truncated_frac": r.finish_reasons.count("length") / len(r.finish_reasons), **stats, "grad_norm": grad_norm,
               "seconds_sample": t_sample, "seconds_update": t_update,
               "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            row["eval"] = evaluate(model, tok, eval_examples, behavior, args, autocast)
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        bar.set_postfix(reward=f"{row['reward_mean']:.2f}", behavior=f"{row['behavior_mean']:.2f}", length=f"{row['length_mean']:.0f}")
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps:
            save_checkpoint(out, step + 1, model, optimizer)

    after = evaluate(model, tok, eval_examples, behavior, args, autocast)
    with open(os.path.join(out, "eval_after.json"), "w") as f:
        json.dump(after, f)
    model.save_pretrained(os.path.join(out, "final"))
    print(f"\n| unsteered, {len(eval_examples)} held-out problems | accuracy | behaviour rate | mean length |")
    print("|---|---|---|---|")
    for name, m in (("before", before), ("after", after)):
        print(f"| {name} | {m['accuracy']:.2f} | {m['behavior']:.2f} | {m['length']:.0f} |")
    plotted = plot(log_path, os.path.join(out, "curves.png"))
    print(f"\nsaved {out}/final (model), log.jsonl" + (", curves.png" if plotted else " (pip install matplotlib for curves.png)"))


if __name__ == "__main__":
    main()
