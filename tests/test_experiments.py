"""The bandit experiment's mechanics (experiments/bandit.py) and a tiny run of each experiment script."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from experiments import bandit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_vspo_with_zero_intensities_is_grpo_exactly():
    correct, behavior, decoy, logits0 = bandit.make_arms()
    run = lambda intensities: bandit.train(correct, behavior, logits0, behavior, intensities, seeds=4, iters=60, seed=3)
    grpo_hit, grpo_curve = run([0.0])
    zero_hit, zero_curve = run([0.0, 0.0, 0.0])
    steered_hit, steered_curve = run([0.0, 2.5, 5.0])
    assert torch.equal(grpo_curve, zero_curve) and torch.equal(grpo_hit, zero_hit)
    assert not torch.equal(grpo_curve, steered_curve)  # steering does change the update
    assert grpo_curve[-1].mean() != grpo_curve[0].mean()  # and GRPO itself learns something


def test_steered_sampling_matches_formula():
    torch.manual_seed(0)
    logits = torch.randn(6)
    score = torch.tensor([1.0, 0.0, -0.5, 2.0, 0.0, 0.3])
    alpha = 1.7
    expected = logits.exp() * (alpha * score).exp()
    expected = expected / expected.sum()  # eq. (1) written out
    assert torch.allclose(bandit.steered_probs(logits, score, torch.tensor(alpha)), expected, atol=1e-6)
    n = 200_000
    arms = bandit.sample_arms(logits.repeat(n, 1), score, torch.full((n,), alpha), torch.Generator().manual_seed(0))
    freq = torch.bincount(arms, minlength=6).float() / n
    assert 0.5 * (freq - expected).abs().sum() < 0.01
    unsteered = bandit.sample_arms(logits.repeat(n, 1), score, torch.zeros(n), torch.Generator().manual_seed(0))
    assert 0.5 * (torch.bincount(unsteered, minlength=6).float() / n - torch.softmax(logits, -1)).abs().sum() < 0.01


def test_alignment_tv_ends():
    correct, behavior, decoy, logits0 = bandit.make_arms()
    assert bandit.alignment_tv(logits0, behavior, 30.0, behavior) < 1e-6  # pushes onto exactly the behaviour arms
    assert bandit.alignment_tv(logits0, decoy, 30.0, behavior) > 0.999  # pushes onto arms without the behaviour
    assert bandit.alignment_tv(logits0, behavior, 0.0, behavior) > 0.9  # unsteered: the behaviour is rare


def test_bandit_script_tiny(tmp_path):
    out = subprocess.run([sys.executable, "-m", "experiments.bandit", "--seeds", "3", "--iters", "40", "--rhos", "0,1",
                          "--out", str(tmp_path / "b.png")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "| 0.00 |" in out.stdout and "| 1.00 |" in out.stdout


def test_compare_tiny(synthetic, tmp_path):
    from experiments import compare

    model, data, _ = synthetic
    out = tmp_path / "compare"
    argv = ["--behavior", "synthetic", "--model", model, "--eval-data", data, "--steps", "2", "--eval-every", "1",
            "--eval-n", "4", "--out", str(out), "--plot", str(tmp_path / "c.png"), "--train-args",
            f"--data {data} --prompts-per-step 2 --group-size 3 --coeffs 0,20,40 --max-new-tokens 5 --temperature 1.0"]
    compare.main(argv)
    for algo in compare.ALGOS:
        log = [json.loads(l) for l in open(out / f"{algo}-seed0" / "log.jsonl")]
        assert "eval" in log[0] and "eval" not in log[1]  # step 1 evaluated; the last step's is eval_after.json
    diag = json.load(open(out / "diagnostic.json"))
    assert [r["intensity"] for r in diag["rows"]] == [0.0, 0.5, 1.0, 1.5, 2.0]
    mtime = os.path.getmtime(out / "vspo-seed0" / "eval_after.json")
    compare.main(argv)  # finished runs are read back, not trained again
    assert os.path.getmtime(out / "vspo-seed0" / "eval_after.json") == mtime


def test_compare_aggregates_seeds_with_standard_errors(synthetic, tmp_path, capsys):
    from experiments import compare

    one = compare.mean_se([1.0])
    assert one[0] == 1.0 and math.isnan(one[1])  # one seed: no error bar
    m, se = compare.mean_se([0.2, 0.4, 0.9])
    assert m == pytest.approx(0.5) and se == pytest.approx(math.sqrt((0.09 + 0.01 + 0.16) / 2 / 3))
    model, data, _ = synthetic
    out = tmp_path / "compare"
    argv = ["--behavior", "synthetic", "--model", model, "--eval-data", data, "--steps", "2", "--eval-every", "1",
            "--eval-n", "4", "--out", str(out), "--plot", str(tmp_path / "c.png"), "--algos", "vspo,grpo", "--seeds", "0,1",
            "--train-args", f"--data {data} --prompts-per-step 2 --group-size 3 --coeffs 0,20,40 --max-new-tokens 5"]
    compare.main(argv)
    first = capsys.readouterr().out
    runs = {(a, s): compare.read_run(out / f"{a}-seed{s}") for a in ("vspo", "grpo") for s in (0, 1)}
    for algo in ("vspo", "grpo"):
        after = [runs[algo, s]["evals"][-1][1]["behavior"] for s in (0, 1)]
        assert f"| {algo} | 0,1 | 2 | {compare.fmt(*compare.mean_se(after))} |" in first
        zero = [runs[algo, s]["log"][1]["behavior_zero_spread_frac"] for s in (0, 1)]
        assert f" {sum(zero) / 2:.2f} |" in [line for line in first.splitlines() if line.startswith(f"| {algo} | ")][-1]
    compare.main(argv)  # read back: the same tables, nothing trained again
    tables = lambda text: text[text.index("alignment diagnostic (before"):text.index(" runs, ")]
    assert tables(capsys.readouterr().out) == tables(first)


def test_verbosity_rate_reads_off_shorter_budgets():
    from experiments.verbosity_threshold import rate
    from rewards import Completion

    detailed = "First we take 3 apples. Then we add 4 more apples to the pile. Counting them all gives 7. The answer is 7."
    comps = [Completion(detailed, 150, True), Completion(detailed, 110, True), Completion("7", 3, True),
             Completion(detailed, 320, False)]
    assert rate(comps, 100, 320) == 0.5  # the truncated one never counts
    assert rate(comps, 100, 120) == 0.25  # under a budget of 120 the 150-token answer would have been cut off
    assert rate(comps, 140, 320) == 0.25


def test_verbosity_threshold_script_tiny(smollm2, tmp_path, monkeypatch, capsys):
    import steer
    from experiments import verbosity_threshold

    monkeypatch.setattr(steer, "VECTOR_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["verbosity_threshold", "--model", smollm2, "--problems", "2", "--samples", "1",
                                      "--intensities", "0.15", "--max-new-tokens", "12", "--min-tokens", "4,8", "--budgets", "8,12"])
    verbosity_threshold.main()
    rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| 0")]
    assert len(rows) == 4  # intensities 0 and 0.15, budgets 8 and 12


def test_response_vector_script_tiny(smollm2, capsys, monkeypatch):
    """The confidence vector from contrasting responses: extracted and swept end to end (tiny sizes),
    steering the generated tokens only when asked."""
    from experiments import response_vector

    seen = []
    real_sweep = response_vector.sweep
    monkeypatch.setattr(response_vector, "sweep",
                        lambda *a, steer_prompt: seen.append(steer_prompt) or real_sweep(*a, steer_prompt=steer_prompt))
    response_vector.main(["--model", smollm2, "--questions", "2", "--layers", "6", "--intensities", "0.2",
                          "--max-new-tokens", "8", "--answer-tokens", "12", "--steer-prompt", "no"])
    assert seen == [False]
    out = capsys.readouterr().out
    assert "layer 6: |v| =" in out and "pairs agreeing" in out
    assert len([l for l in out.splitlines() if l.startswith("| 6 | 0.20 |")]) == 1


def test_response_pairs_differ_only_by_the_marker(tiny_chat_model):
    from data.load import load_behavior, load_model_and_tokenizer
    from experiments.response_vector import MARKERS, response_pairs

    model, tok = load_model_and_tokenizer(tiny_chat_model)
    behavior = dict(load_behavior("confidence"), questions=["What is 2 + 3?", "What is 9 - 4?"])
    pairs = response_pairs(model, tok, behavior, MARKERS["confidence"], max_new_tokens=6)
    for pos, neg in pairs:
        assert pos[:-1] == neg[:-1] and pos[-1]["content"] == neg[-1]["content"] + "\n\nConfidence: 80%"


def test_bandit_base_rate_flag():
    from experiments.bandit import make_arms

    _, behavior, _, logits0 = make_arms(p_behavior=0.07)
    assert abs((logits0.softmax(-1) * behavior).sum().item() - 0.07) < 1e-6
    out = subprocess.run([sys.executable, "-m", "experiments.bandit", "--p-behavior", "0.6", "--no-plot"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode != 0 and "error: --p-behavior must be above 0 and below 0.5" in out.stderr
