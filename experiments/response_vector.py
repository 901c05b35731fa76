"""
A steering vector from contrasting *responses* rather than instructions, and whether it raises the
rewarded behaviour (confidence's instruction vector lengthens answers but never makes them
state a confidence).

    python -m experiments.response_vector --behavior confidence --layers 6,9,12 --intensities 0.1,0.2,0.3

The model first answers each of the behaviour's questions (greedy, unsteered). Each pair is then
that same answer twice, teacher-forced: once followed by the behaviour's marker (for confidence,
"Confidence: 80%" on a last line) and once without. steer.extract(read="response") averages the
residual stream over each response, so the shared answer cancels in the mean difference and what
remains is the marker's direction. The vectors are then swept on held-out problems exactly as
`python steer.py --sweep` sweeps the instruction vectors (same prompts, seed and statistics).
"""

import argparse
import os
import sys

from data.load import load_behavior, load_examples, load_model_and_tokenizer, user_prompt
from rollout import check_finite, generate, parse_list
from steer import extract, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKERS = {"confidence": "\n\nConfidence: 80%"}


def response_pairs(model, tok, behavior, marker, max_new_tokens):
    """(positive, negative) conversations: the model's own answer with and without the marker."""
    questions = behavior["questions"]
    r = generate(model, [tok.chat(user_prompt(q)) for q in questions], max_new_tokens=max_new_tokens,
                 temperature=0.0, stop_ids=tok.stop_ids, vocab_size=tok.vocab_size)
    answers = [text.strip() for text, _, _ in r.completions(tok)]
    return [(user_prompt(q) + [{"role": "assistant", "content": a + marker}],
             user_prompt(q) + [{"role": "assistant", "content": a}]) for q, a in zip(questions, answers)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--behavior", default="confidence", choices=sorted(MARKERS))
    p.add_argument("--model", default=None)
    p.add_argument("--layers", default="6,9,12")
    p.add_argument("--intensities", default="0.1,0.2,0.3")
    p.add_argument("--questions", type=int, default=24, help="held-out problems per setting")
    p.add_argument("--answer-tokens", type=int, default=96, help="budget of the greedy answers in the pairs")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--steer-prompt", choices=("yes", "no"), default="yes",
                   help="no: steer only the generated tokens, where the vector was read")
    p.add_argument("--data", default=os.path.join(ROOT, "data", "math", "test.jsonl"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        check_finite(args)
        layers = parse_list(args.layers, "--layers", int)
        intensities = parse_list(args.intensities, "--intensities")
        behavior = load_behavior(args.behavior)
        model, tok = load_model_and_tokenizer(args.model, args.device)
        if not all(0 <= layer < model.config.n_layer for layer in layers):
            raise ValueError(f"--layers {args.layers}: the model has layers 0..{model.config.n_layer - 1}")
        pairs = response_pairs(model, tok, behavior, MARKERS[args.behavior], args.answer_tokens)
        vectors = extract(model, tok, pairs, layers, read="response")
        for layer, sv in vectors.items():
            print(f"layer {layer}: |v| = {sv.vector.norm():.2f}, residual norm {sv.resid_norm:.1f}, "
                  f"pairs agreeing {sv.meta['agreement']:.0%}")
        examples = load_examples(args.data, behavior, args.seed)[:args.questions]
        sweep(model, tok, behavior, vectors, examples, layers, intensities, args.max_new_tokens,
              args.temperature, args.seed, steer_prompt=args.steer_prompt == "yes")
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
