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
    assert diag["settings"]["behavior"] == "synthetic" and diag["settings"]["model"] == model
    mtime = os.path.getmtime(out / "vspo-seed0" / "eval_after.json")
    compare.main(argv)  # finished runs are read back, not trained again
    assert os.path.getmtime(out / "vspo-seed0" / "eval_after.json") == mtime
    message = error_of(compare, [*argv, "--steps", "3"])  # the args.json train.py wrote, against the command
    assert str(out / "vspo-seed0" / "args.json") in message and "--steps 2" in message and "--steps 3" in message


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


# -----------------------------------------------------------------------------
# compare.py on run folders built by hand: what it refuses, and how it reads them (nothing is trained)


def write_run(out, algo="grpo", seed=0, steps=4, eval_every=2, eval_n=2, behavior="verbosity", final=True):
    """A finished run folder as train.py and compare.py write one, with made-up numbers: the unsteered
    behaviour rate at step s is seed / 10 + s / 10, so a row that mixes steps or seeds shows it."""
    import train
    from data.load import load_behavior
    from safetensors.torch import save_file

    folder = out / f"{algo}-seed{seed}"
    folder.mkdir(parents=True)
    args = train.parse_args(["--behavior", behavior, "--algo", algo, "--seed", str(seed), "--steps", str(steps),
                             "--eval-every", str(eval_every), "--eval-n", str(eval_n), "--out", str(folder)])
    args.max_new_tokens = train.token_budget(args, load_behavior(behavior))
    args.dtype, args.dtype_chosen_by = "float32", "auto: bf16 matmul 0.00x fp32"  # resolved, as train.main records
    (folder / "args.json").write_text(json.dumps(vars(args), indent=1))
    metrics = lambda step: {"accuracy": 0.5, "behavior": round(seed / 10 + step / 10, 4), "length": 30.0 + step}
    (folder / "eval_before.json").write_text(json.dumps(metrics(0)))
    rows = [{"step": i, "behavior_zero_spread_frac": 0.5} for i in range(steps)]
    for row in rows:
        if eval_every and (row["step"] + 1) % eval_every == 0 and row["step"] + 1 < steps:
            row["eval"] = metrics(row["step"] + 1)
    (folder / "log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "eval_after.json").write_text(json.dumps(metrics(steps)))
    (folder / "minutes").write_text("1.5")
    if final:
        (folder / "final").mkdir()
        save_file({"w": torch.zeros(4)}, str(folder / "final" / "model.safetensors"))
        (folder / "final" / "config.json").write_text("{}")
    return folder


def write_diagnostic(out, **settings):
    """diagnostic.json as compare.py records it, for the default verbosity command with --eval-n 2."""
    from data.load import load_behavior

    recorded = dict(behavior="verbosity", model=None, eval_data=os.path.join(ROOT, "data", "math", "test.jsonl"),
                    eval_n=2, max_new_tokens=load_behavior("verbosity")["max_new_tokens"], temperature=0.5,
                    steer_prompt="yes", seed=0)
    recorded.update(settings)
    row = lambda a: {"layer": 12, "intensity": a, "behavior": a, "accuracy": 0.3, "length": 40.0, "stopped": 1.0,
                     "ppl": 2.0}
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnostic.json").write_text(json.dumps({"layer": 12, "vector_intensity": 0.2, "settings": recorded,
                                                     "rows": [row(0.0), row(0.1), row(0.2)]}))


@pytest.fixture
def no_training(monkeypatch):
    """compare, with training and the diagnostic's sweep made into test failures."""
    import train
    from experiments import compare

    def refuse(*args, **kwargs):
        raise AssertionError("this command must not train or compute the diagnostic")

    monkeypatch.setattr(train, "main", refuse)
    monkeypatch.setattr(compare, "alignment_diagnostic", refuse)
    return compare


def error_of(compare, argv):
    """The message of compare.main's exit: one line, "error: ..."."""
    with pytest.raises(SystemExit) as e:
        compare.main(argv)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_compare_refuses_runs_and_a_diagnostic_of_another_behavior(tmp_path, no_training):
    out = tmp_path / "compare"
    write_run(out)
    write_diagnostic(out)
    before = snapshot(out)
    argv = ["--behavior", "confidence", "--algos", "grpo", "--seeds", "0", "--eval-n", "2", "--out", str(out)]
    message = error_of(no_training, argv)
    assert "diagnostic.json" in message and "--behavior verbosity" in message and "--behavior confidence" in message
    (out / "diagnostic.json").unlink()
    message = error_of(no_training, argv)
    assert str(out / "grpo-seed0" / "args.json") in message and "--behavior verbosity" in message
    assert "--behavior confidence" in message and "another --out" in message
    del before[out / "diagnostic.json"]
    assert snapshot(out) == before  # nothing written, nothing lost


def test_compare_refuses_runs_of_other_steps(tmp_path, no_training):
    """The issue's repro: --steps 4 --eval-every 2 for seed 0, then --steps 6 --eval-every 3 for seeds 0,1."""
    out = tmp_path / "compare"
    write_run(out, seed=0, steps=4, eval_every=2)
    write_run(out, seed=1, steps=6, eval_every=3)
    write_diagnostic(out)
    base = ["--algos", "grpo", "--seeds", "0,1", "--eval-n", "2", "--out", str(out)]
    message = error_of(no_training, [*base, "--steps", "6", "--eval-every", "3"])
    assert str(out / "grpo-seed0") in message and "--steps 4" in message and "--steps 6" in message
    message = error_of(no_training, [*base, "--steps", "4", "--eval-every", "2"])  # once an IndexError
    assert str(out / "grpo-seed1") in message and "--steps 6" in message and "--steps 4" in message
    (out / "diagnostic.json").unlink()
    message = error_of(no_training, [*base, "--steps", "6", "--eval-every", "3", "--seeds", "1", "--eval-n", "3"])
    assert str(out / "grpo-seed1") in message and "--eval-n 2" in message and "--eval-n 3" in message


def test_compare_refuses_to_resume_a_killed_run_with_other_flags(tmp_path, no_training):
    out = tmp_path / "compare"
    folder = write_run(out, final=False)
    (folder / "eval_after.json").unlink()
    (folder / "latest").write_text("checkpoint-2")
    write_diagnostic(out)
    base = ["--algos", "grpo", "--eval-n", "2", "--out", str(out)]
    message = error_of(no_training, [*base, "--steps", "6"])
    assert str(folder / "args.json") in message and "--steps 4" in message and "--steps 6" in message
    message = error_of(no_training, [*base, "--steps", "4", "--eval-every", "2", "--train-args", "--lr 1e-4"])
    assert "--lr 5e-05" in message and "--lr 0.0001" in message


def test_compare_refuses_a_diagnostic_of_another_model(tmp_path, no_training):
    out = tmp_path / "compare"
    write_diagnostic(out)
    other = tmp_path / "other-model"
    message = error_of(no_training, ["--algos", "grpo", "--eval-n", "2", "--out", str(out), "--model", str(other)])
    assert "diagnostic.json" in message and "--model (default)" in message and str(other) in message


def test_compare_aligns_seeds_by_their_recorded_steps(tmp_path, capsys):
    """A safety net under the settings check: seeds evaluated at other steps are never averaged by position."""
    from experiments import compare

    out = tmp_path / "compare"
    runs = [dict(compare.read_run(write_run(out, seed=0, steps=4, eval_every=2)), seed=0),
            dict(compare.read_run(write_run(out, seed=1, steps=6, eval_every=3)), seed=1)]
    points = compare.curve(runs, "behavior")
    assert [(step, seeds) for step, seeds, _ in points] == [(0, [0, 1]), (2, [0]), (3, [1]), (4, [0]), (6, [1])]
    assert [round(m, 4) for _, _, (m, _) in points] == [0.05, 0.2, 0.4, 0.4, 0.7]
    compare.print_tables(None, {"grpo": runs})
    text = capsys.readouterr().out
    assert "| grpo | 0,1 | 0 | 0.05 ± 0.05 |" in text and "| grpo | 0 | 2 | 0.20 |" in text
    assert "| grpo | 1 | 3 | 0.40 |" in text and "| grpo | 1 | 6 | 0.70 |" in text
    assert "| grpo | 0.50 | 0.50 | 0.50 | 0.50 | 0.50 | 0.50 |" in text  # training steps 0-5, seed 1 alone at 4, 5


def test_compare_header_counts_the_problems_the_runs_used(tmp_path, capsys):
    from experiments import compare

    out = tmp_path / "compare"
    write_diagnostic(out)
    diag = json.load(open(out / "diagnostic.json"))
    runs = [dict(compare.read_run(write_run(out, eval_n=2)), seed=0)]
    compare.print_tables(diag, {"grpo": runs})
    text = capsys.readouterr().out
    assert "layer 12, 2 held-out problems" in text and "unsteered model on 2 held-out problems" in text
    assert "48" not in text


DAMAGE = {
    "torn log": ("grpo-seed0/log.jsonl", lambda p: p.write_text(p.read_text()[:-9])),
    "empty log": ("grpo-seed0/log.jsonl", lambda p: p.write_text("")),
    "missing log": ("grpo-seed0/log.jsonl", lambda p: p.unlink()),
    "missing eval_before": ("grpo-seed0/eval_before.json", lambda p: p.unlink()),
    "eval value a string": ("grpo-seed0/eval_after.json",
                            lambda p: p.write_text('{"accuracy": "0.5", "behavior": 0.1, "length": 3}')),
    "eval key missing": ("grpo-seed0/eval_before.json",
                         lambda p: p.write_text('{"accuracy": 0.5, "behavior": 0.1}')),
    "log eval a string": ("grpo-seed0/log.jsonl",
                          lambda p: p.write_text(p.read_text().replace('"length": 32.0', '"length": "x"'))),
    "torn args": ("grpo-seed0/args.json", lambda p: p.write_text(p.read_text()[:50])),
    "torn diagnostic": ("diagnostic.json", lambda p: p.write_text(p.read_text()[:50])),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_compare_damaged_files_are_one_line_errors_naming_them(tmp_path, no_training, damage):
    out = tmp_path / "compare"
    write_run(out)
    write_diagnostic(out)
    name, spoil = DAMAGE[damage]
    spoil(out / name)
    before = snapshot(out)
    for report in ([], ["--report"]):
        message = error_of(no_training, ["--algos", "grpo", "--steps", "4", "--eval-every", "2", "--eval-n", "2",
                                         "--out", str(out), *report])
        assert str(out / name) in message
    assert snapshot(out) == before


def test_compare_unreadable_minutes_is_a_warning(tmp_path, no_training, capsys):
    out = tmp_path / "compare"
    folder = write_run(out)
    (folder / "minutes").write_text("abc")
    write_diagnostic(out)
    no_training.main(["--algos", "grpo", "--steps", "4", "--eval-every", "2", "--eval-n", "2", "--out", str(out),
                      "--plot", str(tmp_path / "c.png")])
    captured = capsys.readouterr()
    assert [line for line in captured.err.splitlines() if str(folder / "minutes") in line]
    assert "| grpo | 0 | 4 | 0.40 |" in captured.out and "1 runs, 0 minutes" in captured.out


@pytest.mark.parametrize("flags, named", [(["--behavior", "nosuch"], "unknown behaviour 'nosuch'"),
                                          (["--seeds", "0,a"], "--seeds '0,a'"),
                                          (["--seeds", "0,0"], "--seeds '0,0'"),
                                          (["--algos", "vspo,nosuch"], "--algos 'vspo,nosuch'"),
                                          (["--steps", "-1"], "--steps must be at least 0"),
                                          (["--train-args", "--steps 5"], "sets --steps"),
                                          (["--train-args", "--nosuch 1"], "unrecognized arguments: --nosuch"),
                                          (["--train-args", "--coeffs 0,a"], "--coeffs '0,a'")])
def test_compare_bad_flags_are_one_line_errors_before_anything_is_written(tmp_path, no_training, flags, named):
    out = tmp_path / "compare"
    assert named in error_of(no_training, ["--out", str(out), *flags])
    assert not out.exists()


def test_compare_report_trains_and_computes_nothing(tmp_path, no_training, capsys):
    out = tmp_path / "compare"
    write_run(out, seed=0)
    killed = write_run(out, seed=1)
    (killed / "eval_after.json").unlink()
    (killed / "latest").write_text("checkpoint-2")
    no_training.main(["--algos", "grpo", "--seeds", "0,1", "--steps", "4", "--eval-every", "2", "--eval-n", "2",
                      "--out", str(out), "--plot", str(tmp_path / "c.png"), "--report"])
    captured = capsys.readouterr()
    assert "no diagnostic.json: the alignment diagnostic is left out" in captured.out
    assert "| grpo | 0 | 4 | 0.40 |" in captured.out and "| grpo | 0,1 |" not in captured.out
    assert "left out, not finished: grpo-seed1" in captured.err
    assert not (out / "diagnostic.json").exists()


def test_compare_finished_means_final_loads(tmp_path, no_training, monkeypatch, capsys):
    """eval_after.json was written before final/: a torn final/ is redone from the last checkpoint, or,
    without one, an error naming it. A folder without final/ nor checkpoint (docs/evidence) is read."""
    import train
    from safetensors.torch import save_file

    out = tmp_path / "compare"
    folder = write_run(out)
    write_diagnostic(out)
    model = folder / "final" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-5])
    argv = ["--algos", "grpo", "--steps", "4", "--eval-every", "2", "--eval-n", "2", "--out", str(out),
            "--plot", str(tmp_path / "c.png")]
    message = error_of(no_training, argv)
    assert str(folder / "final") in message and "no checkpoint" in message
    (folder / "latest").write_text("checkpoint-4")
    calls = []
    redo_final = lambda argv: calls.append(argv) or save_file({"w": torch.zeros(4)}, str(model))
    monkeypatch.setattr(train, "main", redo_final)
    no_training.main(argv)
    assert len(calls) == 1 and calls[0][-1] == "--resume" and calls[0][calls[0].index("--out") + 1] == str(folder)
    assert "| grpo | 0 | 4 | 0.40 |" in capsys.readouterr().out
    bare = write_run(out, seed=1, final=False)  # weights not kept, no checkpoint: its records are read
    no_training.main([*argv, "--seeds", "0,1", "--report"])
    captured = capsys.readouterr()
    assert "| grpo | 0,1 | 4 | 0.45 ± 0.05 |" in captured.out and bare.name in captured.err


def test_compare_steps_0(tmp_path, no_training, capsys):
    out = tmp_path / "compare"
    write_run(out, steps=0)
    write_diagnostic(out)
    no_training.main(["--algos", "grpo", "--steps", "0", "--eval-every", "2", "--eval-n", "2", "--out", str(out),
                      "--plot", str(tmp_path / "c.png"), "--report"])
    text = capsys.readouterr().out
    assert "| grpo | 0 | 0 | 0.00 | 0.50 | 30 |" in text and "share of groups" not in text


def test_compare_default_out_is_per_behavior():
    from experiments import compare

    assert compare.parse_args(["--behavior", "confidence"]).out == os.path.join(ROOT, "runs", "compare-confidence")
    assert compare.parse_args(["--out", "x"]).out == "x"


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
