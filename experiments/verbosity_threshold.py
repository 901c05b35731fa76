"""
How rare is verbosity without steering, and how common with it? The table that picks N.

    python -m experiments.verbosity_threshold             # ~10 min on 2 CPU cores
    python -m experiments.verbosity_threshold --problems 4 --intensities 0.15 --max-new-tokens 40   # seconds

rewards.verbosity pays for an answer of at least N tokens that ends on its own, gives a final
answer and is not repetitive. VSPO's premise is a gap: the behaviour rare for the unsteered
model (at most ~10% at the training temperature) and common under steering (~40% or more).
This samples the training problems once per setting with a generous token budget M_max and
reads off the rate for every (N, M <= M_max): the sampler's first M steps do not depend on the
budget, so a run with budget M would produce the first M tokens of these same samples (up to
float rounding), and an answer longer than M would have been cut off, which earns nothing.
"""

import argparse
import os
import sys

import rewards
from rollout import check_finite, generate, parse_list
from steer import chat_prompt, load_behavior, load_examples, load_model_and_tokenizer, load_or_extract

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rate(comps, n_min, budget):
    """Share of completions that earn the verbosity reward with min_tokens=n_min under max_new_tokens=budget."""
    ok = [c.n_tokens <= budget and rewards.verbosity("", c, None, min_tokens=n_min) for c in comps]
    return sum(ok) / len(ok)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--model", default=None)
    p.add_argument("--data", default=os.path.join(ROOT, "data", "math", "train.jsonl"))
    p.add_argument("--problems", type=int, default=48)
    p.add_argument("--samples", type=int, default=2, help="per problem")
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
    print(f"verbosity rate on {len(prompts)} x {args.samples} samples, T={args.temperature}, layer {sv.layer}")
    print("| intensity | max_new_tokens | " + " | ".join(f"N={n}" for n in n_mins) + " |")
    print("|---|---|" + "---|" * len(n_mins))
    for a in [0.0] + intensities:
        steering = dict(vector=sv.scaled_direction(), layer=sv.layer, coeffs=[a] * (len(prompts) * args.samples)) if a else {}
        r = generate(model, prompts, n=args.samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     stop_ids=tok.stop_ids, seed=args.seed, **steering)
        comps = [rewards.Completion(*c) for c in r.completions(tok)]
        for b in budgets:
            print(f"| {a:g} | {b} | " + " | ".join(f"{rate(comps, n, b):.2f}" for n in n_mins) + " |", flush=True)


if __name__ == "__main__":
    main()
