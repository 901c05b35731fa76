"""
Rewards: pure functions of (prompt, completion, example) -> float, registered by name.

`completion` is a `Completion`: the decoded text plus the two facts about generation that
a text alone does not carry (its length in tokens, and whether it ended on its own with
the stop token or was cut off at max_new_tokens). `example` is the data row, GSM8K-style
({"question", "answer": "... #### 42"}). Standard library only: these run in microseconds
and are tested on hand-written strings, including attempts to game them.

A behaviour reward (every one but accuracy) returns a finite score in [0, 1], so that lambda means
the same for every behaviour; `composite` checks this where the score is computed. Its settings
(the "reward" object of data/behaviors/<name>.json) are declared with it, as `register(name,
settings={...})`: a setting is (int, low, high), (float, low, high) or a tuple of allowed strings.
`data.load.load_behavior` checks a behaviour file against the declaration before any model is
loaded. A reward registered without a declaration (or put into REWARDS directly, as the tests'
"synthetic" one is) takes no settings.
"""

import numbers
import re
from dataclasses import dataclass
from fractions import Fraction


@dataclass
class Completion:
    text: str
    n_tokens: int
    stopped: bool  # ended with a stop token (False: truncated at max_new_tokens)


REWARDS = {}
SETTINGS = {}  # {reward name: {setting: (int | float, low, high) or (allowed strings)}}


def register(name, settings=None):
    def wrap(fn):
        REWARDS[name] = fn
        SETTINGS[name] = settings or {}
        return fn
    return wrap


def behavior_rewards():
    """The registered behaviour rewards: every reward but accuracy, which is the task itself."""
    return [k for k in REWARDS if k != "accuracy"]


def check_settings(behavior, settings):
    """Why `settings` (a behaviour file's "reward" object) do not fit `behavior`'s declaration, or None.
    A bool is not a number here (JSON true would pass Python's isinstance(x, int)), an int is a float,
    a string is never a number; NaN and infinities fail the range test, as every comparison with NaN
    is false."""
    declared = SETTINGS.get(behavior, {})
    if not isinstance(settings, dict):
        return f"reward must be an object (the settings of {behavior}), got {type(settings).__name__}"
    for key, value in settings.items():
        if key not in declared:
            return (f"reward.{key} is not a setting of {behavior} (its settings: "
                    f"{', '.join(declared) or 'none'})")
        rule = declared[key]
        if isinstance(rule[0], type):
            kind, low, high = rule
            number = isinstance(value, int if kind is int else (int, float)) and not isinstance(value, bool)
            if not number or not low <= value <= high:
                what = "an integer" if kind is int else "a number"
                return f"reward.{key} must be {what} from {low} to {high}, got {value!r}"
        elif value not in rule:
            return f"reward.{key} must be one of {', '.join(map(repr, rule))}, got {value!r}"
    return None


# -----------------------------------------------------------------------------
# accuracy

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?"


def parse_number(s):
    """'1,234' '-3.50' '7/2' '$12' -> Fraction, or None. Fractions keep 0.5 == 1/2 exact.
    Only plain decimals and fractions of at most 64 characters: an answer such as '1e10000000' would
    make Fraction compute a ten-million-digit integer, once per scored rollout."""
    s = s.strip().replace(",", "").replace("$", "").rstrip(".")
    if len(s) > 64 or not re.fullmatch(r"-?\d+(?:\.\d+)?(?:/\d+)?", s):
        return None
    try:
        if "/" in s:
            num, den = s.split("/")
            return Fraction(int(num), int(den))
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(text):
    """The final answer a response commits to, by the most explicit marker present:
    '#### x', '\\boxed{x}', 'the answer is x', else the last number in the text."""
    for pattern in (r"####\s*(" + _NUMBER + ")", r"\\boxed\{\s*(" + _NUMBER + r")\s*\}",
                    r"answer is:?\s*\$?\s*(" + _NUMBER + ")"):
        found = re.findall(pattern, text, flags=re.IGNORECASE)
        if found:
            return parse_number(found[-1])
    numbers = re.findall(_NUMBER, text)
    return parse_number(numbers[-1]) if numbers else None


def reference_answer(example):
    return parse_number(example["answer"].split("####")[-1])


@register("accuracy")
def accuracy(prompt, completion, example):
    got = extract_answer(completion.text)
    return float(got is not None and got == reference_answer(example))


# -----------------------------------------------------------------------------
# verbosity


def distinct_ratio(text, n=3):
    """Distinct word n-grams / all word n-grams: 1.0 for fresh text, low for repetition."""
    words = text.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


@register("verbosity", settings={"min_tokens": (int, 1, 100_000), "min_distinct": (float, 0.0, 1.0)})
def verbosity(prompt, completion, example, min_tokens=100, min_distinct=0.6):
    """1 for a detailed answer: at least min_tokens tokens, ended on its own, still gives a
    final answer, and not padded by repetition (distinct word trigram ratio)."""
    return float(completion.stopped and completion.n_tokens >= min_tokens
                 and extract_answer(completion.text) is not None
                 and distinct_ratio(completion.text) >= min_distinct)


# -----------------------------------------------------------------------------
# expertise: is the explanation pitched at the target level?


def syllables(word):
    """A vowel-group count: the usual heuristic of readability formulas (exact counts need a dictionary)."""
    w = re.sub(r"[^a-z]", "", word.lower())
    if not w:
        return 0
    count = len(re.findall(r"[aeiouy]+", w))
    if w.endswith("e") and not w.endswith(("le", "ee")) and count > 1:
        count -= 1
    return max(1, count)


def reading_grade(text):
    """Flesch-Kincaid grade level (Kincaid et al. 1975): 0.39 words/sentence + 11.8 syllables/word - 15.59."""
    words = re.findall(r"[A-Za-z]+(?:'[a-z]+)?", text)
    sentences = max(1, len(re.findall(r"[.!?]+(?:\s|$)", text)))
    if not words:
        return 0.0
    return 0.39 * len(words) / sentences + 11.8 * sum(syllables(w) for w in words) / len(words) - 15.59


# markers of a specialist register: notation, formal connectives, technical terms
_EXPERT_MARKERS = re.compile(r"\\[a-z]+|[=<>≤≥∑∫√×÷]|\b(?:therefore|thus|hence|denote|variable|"
                             r"equation|operand|arithmetic|summation|integer|quantity|respectively|"
                             r"subsequently|commutative)\b", re.IGNORECASE)
LEVELS = {"beginner": 4.0, "intermediate": 8.0, "expert": 12.0}  # target reading grades


@register("expertise", settings={"target": tuple(LEVELS), "min_words": (int, 1, 10_000)})
def expertise(prompt, completion, example, target="beginner", min_words=25):
    """In [0, 1]: how close the explanation's register is to the target level. Readability (grade level)
    and the density of notation/jargon, each scored against the target; a short answer is not an
    explanation and a repetitive one is not an explanation either (both score 0)."""
    text = completion.text
    words = text.split()
    if target not in LEVELS:
        raise ValueError(f"expertise target must be one of {', '.join(LEVELS)}, got {target!r}")
    if len(words) < min_words or distinct_ratio(text) < 0.6 or not completion.stopped:
        return 0.0
    grade = reading_grade(text)
    jargon = len(_EXPERT_MARKERS.findall(text)) / len(words)
    # distance in grades past the target: beginner means "at most grade 4", expert "at least grade 12",
    # intermediate "near grade 8"; a full point within 1 grade of that, none 5 or more grades past it
    off = {"beginner": grade - LEVELS[target], "intermediate": abs(grade - LEVELS[target]),
           "expert": LEVELS[target] - grade}[target]
    grade_score = min(1.0, max(0.0, 1.0 - (off - 1.0) / 4.0))
    jargon_score = {"beginner": 1.0 - min(1.0, jargon / 0.05), "intermediate": 1.0,
                    "expert": min(1.0, jargon / 0.05)}[target]
    return grade_score * jargon_score


# -----------------------------------------------------------------------------
# confidence: a stated, calibrated confidence


def stated_confidence(text):
    """The last 'Confidence: NN%' (or 'confidence of NN%' / 'NN% confident') as a probability, or None."""
    found = re.findall(r"confidence\s*(?:level)?\s*(?::|is|of)?\s*(\d{1,3}(?:\.\d+)?)\s*%"
                       r"|(\d{1,3}(?:\.\d+)?)\s*%\s*confident", text, flags=re.IGNORECASE)
    if not found:
        return None
    value = float(found[-1][0] or found[-1][1])
    return value / 100.0 if value <= 100 else None


@register("confidence")
def confidence(prompt, completion, example):
    """0 without a stated confidence; otherwise 1 - Brier score = 1 - (p - correct)^2, a proper scoring
    rule: the expected reward is highest when p is the true probability of being right, so claiming
    100% on a wrong answer earns 0 and hedging at 50% earns 0.75 whatever the outcome."""
    p = stated_confidence(completion.text)
    if p is None:
        return 0.0
    return 1.0 - (p - accuracy(prompt, completion, example)) ** 2


# -----------------------------------------------------------------------------
# robustness: stay right despite a misleading hint in the prompt


@register("robustness")
def robustness(prompt, completion, example):
    """Accuracy on a prompt that carries a wrong suggested answer (example["hint"]). Repeating the hint is
    never right, since hints are chosen to be wrong."""
    got = extract_answer(completion.text)
    if "hint" in example and got is not None and got == parse_number(str(example["hint"])):
        return 0.0
    return accuracy(prompt, completion, example)


# -----------------------------------------------------------------------------
# the composite reward of VSPO and reward-shaped GRPO: accuracy + lambda * behaviour


def composite(prompt, completion, example, behavior, lam=1.0, **behavior_kwargs):
    """-> (reward, accuracy, behaviour score). `behavior` names a registered reward, whose score must be
    a finite number in [0, 1]: a custom reward that returns 5 or NaN would otherwise drown accuracy, or
    turn every advantage into NaN, without a word."""
    if behavior not in behavior_rewards():
        raise ValueError(f"unknown behaviour {behavior!r}; known: {', '.join(behavior_rewards())}")
    acc = accuracy(prompt, completion, example)
    beh = REWARDS[behavior](prompt, completion, example, **behavior_kwargs)
    if not isinstance(beh, numbers.Real) or not 0.0 <= beh <= 1.0:  # NaN fails the comparison too
        raise ValueError(f"behaviour reward {behavior!r} returned {beh!r}; a behaviour score must be a "
                         "finite number in [0, 1]")
    return acc + lam * beh, acc, beh
