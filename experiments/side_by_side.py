"""
What steering does to one prompt: samples at several steering intensities, printed side by side.

    python -m experiments.side_by_side --behavior verbosity \\
        --prompt "Tom has 4 apples. Tom gets 3 more apples. How many apples does Tom have now?" \\
        --coeffs 0,0.1,0.2,0.3 --max-new-tokens 256
"""

import argparse
import os
import shutil
import sys
import textwrap
import time

from data.load import load_model_and_tokenizer
from rollout import check_finite, generate, parse_list
from steer import load_or_extract


def show_side_by_side(texts, headers, width):
    col = max(20, width // len(texts) - 3)
    wrapped = [textwrap.wrap(t.replace("\n", " / "), col) or [""] for t in texts]
    print(" | ".join(h[:col].ljust(col) for h in headers))
    print("-+-".join("-" * col for _ in texts))
    for i in range(max(len(w) for w in wrapped)):
        print(" | ".join((w[i] if i < len(w) else "").ljust(col) for w in wrapped))


def main():
    parser = argparse.ArgumentParser(description="Sample one prompt at several steering intensities and "
                                                 "print the samples side by side.")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--model", default=None,
                        help="checkpoint folder (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--behavior", default=None,
                        help="steer with this behaviour's vector (see data/behaviors/)")
    parser.add_argument("--coeffs", default="0",
                        help="comma-separated intensities, one column each (relative to the residual norm)")
    parser.add_argument("--n", type=int, default=1, help="samples per intensity")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--layer", type=int, default=None,
                        help="steering layer (default: the vector's chosen layer)")
    parser.add_argument("--steer-prompt", choices=["yes", "no"], default="yes",
                        help="steer prompt positions too, or generated ones only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    try:
        check_finite(args)
        coeffs = parse_list(args.coeffs, "--coeffs")
        model, tok = load_model_and_tokenizer(args.model, args.device)
        vector = layer = None
        if args.behavior:
            sv = load_or_extract(model, tok, args.behavior, args.model, layer=args.layer)
            vector, layer = sv.scaled_direction().to(args.device), sv.layer
        elif any(coeffs):
            raise ValueError("--coeffs other than 0 need a --behavior to steer with")
        prompt = tok.chat([{"role": "user", "content": args.prompt}])
        t0 = time.time()
        r = generate(model, [prompt] * len(coeffs), n=args.n, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature,
                     top_p=args.top_p, stop_ids=tok.stop_ids, seed=args.seed, vector=vector, layer=layer,
                     vocab_size=tok.vocab_size,
                     coeffs=[c for c in coeffs for _ in range(args.n)],
                     steer_prompt=args.steer_prompt == "yes")
        elapsed = time.time() - t0
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    texts = [text for text, _, _ in r.completions(tok)]
    headers = [f"coeff {c:g}: {int(length)} tok, {why}" for c, length,
               why in zip(r.coeffs.tolist(), r.completion_lens, r.finish_reasons)]
    show_side_by_side(texts, headers, shutil.get_terminal_size((160, 40)).columns)
    print(f"\n{int(r.completion_lens.sum())} tokens in {elapsed:.1f} s")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
