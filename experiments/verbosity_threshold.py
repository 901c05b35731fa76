"""
How rare is verbosity without steering, and how common with it, per rollout and per group? The
table that picks N and the token budget.

    python -m experiments.verbosity_threshold             # 48 problems x 6 samples per setting
    python -m experiments.verbosity_threshold --problems 4 --intensities 0.15 --max-new-tokens 40  # seconds

rewards.verbosity pays for an answer of at least N tokens that ends on its own, gives a final
answer and is not repetitive. VSPO's premise is a gap: the behaviour rare for the unsteered
model and common under steering. What starves GRPO is not a low mean rate but groups with no
success at all: a group of G rollouts of one problem in which no rollout shows the behaviour has
no behaviour signal. So each setting samples G rollouts (--samples, the default group size) of
each training problem and reports both the rate and the share of groups with at least one success.

It samples once per setting with a generous token budget M_max and reads off every (N, M <= M_max):
each row's random numbers do not depend on the budget (rollout.row_uniforms), so a run with budget
M would produce the first M tokens of these same samples, and an answer longer than M would have
been cut off, which earns nothing.
"""

import argparse
import os
import sys

import rewards
from rollout import check_finite, generate, parse_list
from data.load import chat_prompt, load_behavior, load_examples, load_model_and_tokenizer
from steer import load_or_extract

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def earns(c, n_min, budget):
    """Whether a completion earns the verbosity reward with min_tokens=n_min under max_new_tokens=budget."""
    return c.n_tokens <= budget and bool(rewards.verbosity("", c, None, min_tokens=n_min))


def rate(comps, n_min, budget):
    """Share of completions that earn the verbosity reward with min_tokens=n_min within the budget."""
    return sum(earns(c, n_min, budget) for c in comps) / len(comps)


def groups_with_success(comps, group_size, n_min, budget):
    """Share of groups (runs of group_size completions, one problem each) with at least one success."""
    groups = [comps[i:i + group_size] for i in range(0, len(comps), group_size)]
    return sum(any(earns(c, n_min, budget) for c in g) for g in groups) / len(groups)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--model", default=None)
    p.add_argument("--data", default=os.path.join(ROOT, "data", "math", "train.jsonl"))
    p.add_argument("--problems", type=int, default=48)
    p.add_argument("--samples", type=int, default=6,
                   help="per problem: a group (train.py's default --group-size)")
    p.add_argument("--intensities", default="0.1,0.15,0.2")
    p.add_argument("--max-new-tokens", type=int, default=320)
    p.add_argument("--min-tokens", default="80,100,120,140,160")
    p.add_argument("--budgets", default="200,256,320", help="max_new_tokens values to read off")
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    try:
        check_finite(args)
        intensities = parse_list(args.intensities, "--intensities")
        n_mins = parse_list(args.min_tokens, "--min-tokens", int)
        budgets = [b for b in parse_list(args.budgets, "--budgets", int) if b <= args.max_new_tokens]
    except ValueError as e:
        sys.exit(f"error: {e}")
    model, tok = load_model_and_tokenizer(args.model)
    sv = load_or_extract(model, tok, "verbosity", args.model)
    behavior = load_behavior("verbosity")
    examples = load_examples(args.data, behavior, args.seed)[:args.problems]
    prompts = [chat_prompt(tok, ex, behavior) for ex in examples]
    G = args.samples
    print(f"verbosity on {len(prompts)} problems x {G} samples, T={args.temperature}, layer {sv.layer}, seed "
          f"{args.seed}: rate (share of groups with at least one success); accuracy counts answers that end "
          "within the budget")
    print("| intensity | max_new_tokens | ended on its own | accuracy | "
          + " | ".join(f"N={n}" for n in n_mins) + " |")
    print("|---|---|---|---|" + "---|" * len(n_mins))
    for a in [0.0] + intensities:
        steering = dict(vector=sv.scaled_direction(), layer=sv.layer,
                        coeffs=[a] * (len(prompts) * G)) if a else {}
        r = generate(model, prompts, n=G, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     stop_ids=tok.stop_ids, seed=args.seed, vocab_size=tok.vocab_size, **steering)
        comps = [rewards.Completion(*c) for c in r.completions(tok)]
        rows = [ex for ex in examples for _ in range(G)]
        for b in budgets:
            ended = sum(c.stopped and c.n_tokens <= b for c in comps) / len(comps)
            right = [c.n_tokens <= b and rewards.accuracy("", c, ex) for c, ex in zip(comps, rows)]
            acc = sum(right) / len(comps)
            cells = [f"{rate(comps, n, b):.2f} ({groups_with_success(comps, G, n, b):.2f})" for n in n_mins]
            print(f"| {a:g} | {b} | {ended:.2f} | {acc:.2f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
