"""
Steering vectors: the direction in the residual stream that makes a behaviour common at sampling time.

Method (activation addition with a mean difference, as in Turner et al. 2023 and Rimsky
et al. 2024): render each question twice, once with the behaviour's positive instruction
and once with its negative one; read the residual stream at the output of block l; the
vector is mean(positive) - mean(negative). Steering adds `intensity * resid_norm * v/|v|`
at the same point, so an intensity is a fraction of the typical residual-stream norm at
that layer and means the same on another model or layer.

Behaviours are data: data/behaviors/<name>.json holds the positive and negative
instructions, a pool of questions, and a default layer and intensity. A user adds a
behaviour by adding a file.

    python steer.py --behavior verbosity                 # extract (all layers) and save
    python steer.py --behavior verbosity --sweep         # layer x intensity table; records the chosen default
"""

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import rewards
from data.load import (DEFAULT_MODEL, chat_prompt, load_behavior, load_examples, load_model_and_tokenizer,
                       sampling_budget, user_prompt)
from rollout import check_finite, completion_logprobs, generate, left_pad, parse_list

ROOT = os.path.dirname(os.path.abspath(__file__))
VECTOR_DIR = os.path.join(ROOT, "checkpoints", "vectors")
LAYER_CONVENTION = ("output of block `layer` (0-based): TransformerLens blocks.{layer}.hook_resid_post, "
                    "transformers hidden_states[layer + 1]")


def contrastive_pairs(behavior, questions=None):
    """(positive, negative) conversations: each question with the behaviour's two instructions."""
    return [(user_prompt(q, behavior["positive"]),
             user_prompt(q, behavior["negative"])) for q in questions or behavior["questions"]]


# -----------------------------------------------------------------------------
# Extraction


@dataclass
class SteeringVector:
    vector: torch.Tensor  # (C,) the raw mean difference
    layer: int
    resid_norm: float  # mean L2 norm of the residual stream at this layer, at the read positions
    intensity: float  # the default intensity, in units of resid_norm
    meta: dict = field(default_factory=dict)

    def scaled_direction(self):
        """v/|v| * resid_norm: with this as the steering vector, the coefficient *is* the intensity."""
        return self.vector / self.vector.norm() * self.resid_norm


def _render(tok, conversation, read):
    """(ids, first read position): the last prompt token, or the assistant response's tokens."""
    if read == "last":
        ids = tok.chat(conversation, add_generation_prompt=True)
        return ids, len(ids) - 1
    if conversation[-1]["role"] != "assistant":
        raise ValueError('read="response" needs conversations that end with an assistant message')
    prefix = tok.chat(conversation[:-1], add_generation_prompt=True)
    return prefix + tok.encode(conversation[-1]["content"]), len(prefix)


@torch.no_grad()
def _mean_activations(model, seqs, layers, batch_size):
    """For each (ids, start): the residual stream at each layer averaged over ids[start:]
    -> {layer: (n, C)}, norms."""
    means, norms = {l: [] for l in layers}, {l: [] for l in layers}
    device = next(model.parameters()).device
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        tokens, positions, pmask = left_pad([ids for ids, _ in chunk], device)
        _, reads = model.hidden(tokens, positions=positions, padding_mask=pmask, read_layers=set(layers))
        T = tokens.size(1)
        cols = torch.arange(T, device=device)
        # (B, T, 1)
        read = torch.stack([cols >= T - len(ids) + start for ids, start in chunk]).float().unsqueeze(-1)
        for l in layers:
            h = reads[l].float()  # (B, T, C)
            means[l].append((h * read).sum(1) / read.sum(1))
            norm = h.norm(dim=-1, keepdim=True)  # (B, T, 1)
            norms[l].append((norm * read).sum(1).squeeze(-1) / read.sum(1).squeeze(-1))
    return {l: torch.cat(means[l]) for l in layers}, {l: torch.cat(norms[l]) for l in layers}


def extract(model, tok, pairs, layers, read="last", batch_size=16):
    """Mean-difference steering vectors at each of `layers` -> {layer: SteeringVector}.

    pairs: (positive, negative) conversations. read="last": activations at the last prompt
    token (where the model decides how to answer); read="response": averaged over the
    tokens of a final assistant message. Padding-aware, computed in fp32.
    """
    pos = [_render(tok, p, read) for p, _ in pairs]
    neg = [_render(tok, n, read) for _, n in pairs]
    pos_mean, pos_norm = _mean_activations(model, pos, layers, batch_size)
    neg_mean, neg_norm = _mean_activations(model, neg, layers, batch_size)
    out = {}
    for l in layers:
        v = pos_mean[l].mean(0) - neg_mean[l].mean(0)  # (C,)
        # The mean difference always projects higher on average; check that most pairs agree, so
        # that the direction is not the work of a few outliers (or of swapped instructions)
        agreement = ((pos_mean[l] - neg_mean[l]) @ v > 0).float().mean().item()
        if agreement < 0.5:
            raise ValueError(f"layer {l}: only {agreement:.0%} of pairs project higher on the positive side; "
                             "check the pairs")
        meta = {"method": "mean_difference", "read": read, "layer_convention": LAYER_CONVENTION,
                "n_pairs": len(pairs),
                "hidden_size": model.config.n_embd, "vector_norm": v.norm().item(), "agreement": agreement}
        out[l] = SteeringVector(v, l, torch.cat([pos_norm[l], neg_norm[l]]).mean().item(), intensity=0.0,
                                meta=meta)
    return out


def save_vectors(path, vectors, chosen_layer, meta):
    """All layers' vectors in one safetensors file; metadata (JSON strings) says which layer and
    intensity are the default."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tensors = {f"layer.{l}": sv.vector.float().contiguous().cpu() for l, sv in vectors.items()}
    per_layer = {str(l): {"resid_norm": sv.resid_norm, **sv.meta} for l, sv in vectors.items()}
    info = {**meta, "chosen_layer": chosen_layer, "intensity": vectors[chosen_layer].intensity,
            "layers": per_layer}
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"vspo": json.dumps(info)})
    os.replace(tmp, path)


def load_vectors(path):
    """-> ({layer: SteeringVector}, metadata). Default intensities are those recorded for the chosen layer.
    The tensors themselves are checked, not only the metadata: a vector that is not a finite, non-zero
    float vector of the recorded hidden size, or a norm or intensity that is not a finite number, is a
    one-line error here rather than a crash in the sampler."""
    try:
        with safe_open(path, framework="pt") as f:
            info = json.loads(f.metadata()["vspo"])
            vectors = {}
            for key in f.keys():
                l = int(key.split(".")[1])
                m = info["layers"][str(l)]
                vectors[l] = SteeringVector(f.get_tensor(key), l, m["resid_norm"], info["intensity"],
                                            {k: v for k, v in m.items() if k != "resid_norm"})
    except Exception as e:
        raise ValueError(f"{path}: not a steering vector file written by steer.py "
                         f"({str(e).splitlines()[0]})") from None
    hidden_size = info.get("hidden_size") if isinstance(info, dict) else None
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
        # named here: the shape check below would otherwise report "not (None,)" or "not ('8',)"
        what = "missing" if hidden_size is None else f"{hidden_size!r}, not a positive integer"
        raise ValueError(f"{path}: metadata hidden_size is {what}; delete the file to extract the vectors "
                         "again")
    for l, sv in vectors.items():
        why = _unusable(sv, hidden_size)
        if why:
            raise ValueError(f"{path}: the vector of layer {l} {why}; delete the file to extract the vectors "
                             "again")
    if info.get("chosen_layer") not in vectors:
        raise ValueError(f"{path}: chosen_layer {info.get('chosen_layer')!r} is not one of its layers; "
                         "delete the file to extract the vectors again")
    return vectors, info


def _unusable(sv, hidden_size):
    """Why a loaded steering vector cannot be used, or None."""
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    v = sv.vector
    if not v.is_floating_point():
        return f"is {v.dtype}, not floating point"
    if tuple(v.shape) != (hidden_size,):
        return f"has shape {tuple(v.shape)}, not ({hidden_size},)"
    if not torch.isfinite(v).all():
        return "holds NaN or infinite values"
    if not v.any():
        return "is zero, so it has no direction"
    if not number(sv.resid_norm) or sv.resid_norm <= 0:
        return f"has resid_norm {sv.resid_norm!r}, not a positive number"
    if not number(sv.intensity):
        return f"has intensity {sv.intensity!r}, not a finite number"
    return None


def definition_hash(behavior):
    """A fingerprint of what the vectors are extracted from (the instructions and questions), so that
    editing a behaviour's file invalidates the vectors saved for it."""
    text = json.dumps([behavior["positive"], behavior["negative"], behavior["questions"]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_fingerprint(model_path):
    """sha256 of what a steering vector depends on: config.json, the tokenizer files and the bytes of
    every weight file. Two checkpoints that share a folder name (two runs' `final`, any two
    `checkpoint-N`) get different fingerprints; a copy of the same model gets the same one. It reads
    the weights once per call."""
    folder = model_path or DEFAULT_MODEL
    names = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")
                   or f.endswith(".safetensors.index.json"))
    h = hashlib.sha256()
    for name in ["config.json", "tokenizer.json", "tokenizer_config.json", *names]:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                h.update(name.encode() + b"\0" + hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def vector_path(model_path, behavior, fingerprint=None):
    """checkpoints/vectors/<model folder name>-<fingerprint>/<behavior>.safetensors: keyed by the model
    itself, so that a vector is never reused for another model with the same folder name."""
    fingerprint = fingerprint or model_fingerprint(model_path)
    name = os.path.basename(os.path.normpath(model_path or DEFAULT_MODEL))
    return os.path.join(VECTOR_DIR, f"{name}-{fingerprint[:16]}", f"{behavior}.safetensors")


def load_or_extract_all(model, tok, behavior_name, model_path=None):
    """Every layer's vector for this behaviour and model -> ({layer: SteeringVector}, metadata, file path).
    Read from the file when it exists; otherwise extracted once and saved, with the behaviour's defaults."""
    fingerprint = model_fingerprint(model_path)
    path = vector_path(model_path, behavior_name, fingerprint)
    behavior = load_behavior(behavior_name)
    if os.path.isfile(path):
        vectors, info = load_vectors(path)
        if max(vectors) >= model.config.n_layer:
            raise ValueError(f"{path}: a vector for layer {max(vectors)}, but the model has layers "
                             f"0..{model.config.n_layer - 1}; delete the file to extract the vectors again")
        if info.get("model_fingerprint") != fingerprint or info.get("hidden_size") != model.config.n_embd:
            print(f"{path}: extracted from another model than {model_path or DEFAULT_MODEL}; extracting "
                  "again")
        elif info.get("definition") != definition_hash(behavior):
            print(f"{path}: data/behaviors/{behavior_name}.json changed since these vectors were extracted; "
                  "extracting again")
        else:
            return vectors, info, path
    vectors = extract(model, tok, contrastive_pairs(behavior), range(model.config.n_layer))
    default = min(behavior["layer"], model.config.n_layer - 1)
    for sv in vectors.values():
        sv.intensity = behavior["intensity"]
    info = {"behavior": behavior_name,
            "model": os.path.basename(os.path.normpath(model_path or DEFAULT_MODEL)),
            "model_fingerprint": fingerprint, "hidden_size": model.config.n_embd,
            "definition": definition_hash(behavior),
            "chosen_by": "data/behaviors default", "chosen_layer": default,
            "intensity": behavior["intensity"]}
    save_vectors(path, vectors, default, info)
    return vectors, info, path


def load_or_extract(model, tok, behavior_name, model_path=None, layer=None):
    """The behaviour's steering vector for this model at `layer` (default: the recorded choice),
    carrying the recorded default intensity."""
    vectors, info, _ = load_or_extract_all(model, tok, behavior_name, model_path)
    chosen = info["chosen_layer"] if layer is None else layer
    if chosen not in vectors:
        raise ValueError(f"layer {chosen} is out of range: the model has layers "
                         f"0..{model.config.n_layer - 1}")
    return vectors[chosen]


# -----------------------------------------------------------------------------
# The sweep: which layer and intensity make the behaviour common without breaking the model?


@torch.no_grad()
def rollout_stats(model, tok, r, examples, behavior_fn):
    """Behaviour rate, accuracy, length, repetition and coherence (perplexity under the unsteered model)."""
    comps = [rewards.Completion(*c) for c in r.completions(tok)]
    rows = [examples[int(p)] for p in r.prompt_index]
    logp, _ = completion_logprobs(model, r, list(range(len(comps))), temperature=1.0)  # 0 off the completions
    n = len(comps)
    behavior = sum(behavior_fn("", c, ex) for c, ex in zip(comps, rows)) / n if behavior_fn else float("nan")
    return {
        "behavior": behavior,
        "accuracy": sum(rewards.accuracy("", c, ex) for c, ex in zip(comps, rows)) / n,
        "length": sum(c.n_tokens for c in comps) / n,
        "stopped": sum(c.stopped for c in comps) / n,
        "distinct": sum(rewards.distinct_ratio(c.text) for c in comps) / n,
        "ppl": math.exp(-logp.sum().item() / max(1, int(r.completion_mask.sum()))),
    }


def sweep(model, tok, behavior, vectors, examples, layers, intensities, max_new_tokens, temperature, seed,
          steer_prompt=True):
    behavior_fn = rewards.REWARDS.get(behavior["name"])
    kw = dict(behavior.get("reward", {}))
    fn = (lambda p, c, ex: behavior_fn(p, c, ex, **kw)) if behavior_fn else None
    # as training builds them (robustness: with the hint)
    prompts = [chat_prompt(tok, ex, behavior) for ex in examples]
    results = []
    base = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                    stop_ids=tok.stop_ids, seed=seed,
                    vocab_size=tok.vocab_size)
    baseline = {"layer": "-", "intensity": 0.0, **rollout_stats(model, tok, base, examples, fn)}
    print_row(baseline, header=True)
    for layer in layers:
        for a in intensities:
            t0 = time.time()
            r = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                         stop_ids=tok.stop_ids,
                         vocab_size=tok.vocab_size,
                         seed=seed, vector=vectors[layer].scaled_direction(), layer=layer,
                         coeffs=[a] * len(prompts),
                         steer_prompt=steer_prompt)
            row = {"layer": layer, "intensity": a, **rollout_stats(model, tok, r, examples, fn),
                   "seconds": time.time() - t0}
            print_row(row)
            results.append(row)
    return baseline, results


def choose(baseline, results):
    """The most behaviour for the least damage: among settings that stay coherent (perplexity under the
    unsteered model at most 2x the baseline's, repetition not much worse, at least 75% of answers ending
    on their own), the highest behaviour rate, then the lowest intensity. Accuracy is left out on purpose:
    what steering costs in accuracy is what VSPO's composite reward trades against the behaviour."""
    ok = [r for r in results if r["ppl"] <= 2 * baseline["ppl"]
          and r["distinct"] >= baseline["distinct"] - 0.15
          and r["stopped"] >= 0.75]
    if not ok:
        return None
    return max(ok, key=lambda r: (r["behavior"], -r["intensity"]))


def print_row(row, header=False):
    cols = ["layer", "intensity", "behavior", "accuracy", "length", "stopped", "distinct", "ppl"]
    if header:
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)
    print("| " + " | ".join(fmt(row[c]) for c in cols) + " |", flush=True)


def main():
    parser = argparse.ArgumentParser(
        description="Extract a behaviour's steering vectors; --sweep picks a layer and intensity.")
    parser.add_argument("--behavior", required=True)
    parser.add_argument("--model", default=None,
                        help="checkpoint folder (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--layers", default=None,
                        help="comma-separated layers to sweep (default: every 3rd from 3 to 3/4 depth)")
    parser.add_argument("--intensities", default="0.25,0.5,0.75,1.0")
    parser.add_argument("--questions", type=int, default=16, help="held-out problems per setting")
    parser.add_argument("--data", default=os.path.join(ROOT, "data", "math", "test.jsonl"))
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="token budget per sample (default: the behaviour's max_new_tokens, else 256, "
                             "as in train.py)")
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--steer-prompt", choices=["yes", "no"], default="yes",
                        help="no: steer generated tokens only; the intensity chosen then suits "
                             "train.py --steer-prompt no")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from data.problems import DataError

    try:
        check_finite(args)
        intensities = parse_list(args.intensities, "--intensities")
        behavior = load_behavior(args.behavior)
        model, tok = load_model_and_tokenizer(args.model, args.device)
        L = model.config.n_layer
        layers = parse_list(args.layers, "--layers",
                            int) if args.layers else list(range(3, 3 * L // 4 + 1, 3))
        if not all(0 <= layer < L for layer in layers):
            raise ValueError(f"--layers {args.layers}: the model has layers 0..{L - 1}")
        if args.questions < 1:
            raise ValueError("--questions must be at least 1")
        vectors, info, path = load_or_extract_all(model, tok, args.behavior, args.model)
        sv = vectors[info["chosen_layer"]]
        print(f"{path}: {len(vectors)} layers; chosen layer {info['chosen_layer']}, intensity "
              f"{info['intensity']} (|v| = {sv.vector.norm():.1f}, residual norm {sv.resid_norm:.1f})")
        if not args.sweep:
            return
        examples = load_examples(args.data, behavior, args.seed)[:args.questions]
        # the budget training uses, so that the chosen setting is measured under the same cut-off
        baseline, results = sweep(model, tok, behavior, vectors, examples, layers, intensities,
                                  sampling_budget(behavior, args.max_new_tokens),
                                  args.temperature, args.seed, args.steer_prompt == "yes")
    except (ValueError, OSError, DataError) as e:
        sys.exit(f"error: {e}")
    best = choose(baseline, results)
    if best is None:
        print("no setting stayed coherent; keeping the recorded default")
        return
    vectors[best["layer"]].intensity = best["intensity"]
    info.update(chosen_layer=best["layer"],
                chosen_by=f"sweep: {args.questions} problems, T={args.temperature}, seed {args.seed}, "
                          f"--steer-prompt {args.steer_prompt}")
    save_vectors(path, vectors, best["layer"],
                 {k: v for k, v in info.items() if k not in ("layers", "intensity", "chosen_layer")})
    print(f"chosen: layer {best['layer']}, intensity {best['intensity']} (behaviour {best['behavior']:.2f} "
          f"vs {baseline['behavior']:.2f} unsteered); recorded in {path}")


if __name__ == "__main__":
    main()
