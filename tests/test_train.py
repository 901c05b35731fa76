import json
import os

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import write_hf_checkpoint
from model import Transformer
from tokenizer import Tokenizer


def run(synthetic, algo, out, *extra):
    model, data, _ = synthetic
    args = ["--behavior", "synthetic", "--algo", algo, "--model", model, "--data", data, "--eval-data", data, "--steps", "6",
            "--prompts-per-step", "2", "--group-size", "6", "--coeffs", "0,20,40", "--max-new-tokens", "6", "--temperature", "1.0",
            "--lr", "3e-3", "--eval-n", "12", "--micro-batch", "5", "--seed", "0", "--out", str(out), *extra]
    train.main(args)
    with open(os.path.join(out, "eval_before.json")) as f, open(os.path.join(out, "eval_after.json")) as g:
        return json.load(f), json.load(g)


def test_vspo_teaches_the_unsteered_model_what_grpo_cannot_find(synthetic):
    _, _, tmp = synthetic
    before, vspo_after = run(synthetic, "vspo", tmp / "vspo")
    _, grpo_after = run(synthetic, "grpo", tmp / "grpo")
    log = [json.loads(l) for l in open(tmp / "vspo" / "log.jsonl")]
    assert before["behavior"] <= 0.2  # rare for the unsteered model (about 5% over 1200 samples; here 12)
    assert log[0]["behavior_by_coeff"]["40"] > log[0]["behavior_by_coeff"]["0"]  # common under steering
    assert vspo_after["behavior"] >= before["behavior"] + 0.3
    assert vspo_after["behavior"] > grpo_after["behavior"] + 0.2
    assert os.path.isfile(tmp / "vspo" / "final" / "model.safetensors")
    for key in ("reward_mean", "zero_spread_frac", "behavior_zero_spread_frac", "behavior_by_coeff", "truncated_frac", "kl", "clip_frac", "entropy",
                "grad_norm", "seconds_sample", "seconds_update", "peak_rss_gb"):
        assert key in log[0]


@pytest.mark.parametrize("extra", [(), ("--beta", "0.1", "--old-logprobs", "steered", "--updates-per-batch", "2", "--train-layers", "2")])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(synthetic, monkeypatch, extra):
    _, _, tmp = synthetic
    run(synthetic, "vspo", tmp / "whole", "--checkpoint-every", "2", *extra)
    real_save = train.save_checkpoint

    def killed_after_step_4(out, step, *a):
        real_save(out, step, *a)
        if step == 4:
            raise KeyboardInterrupt  # the run dies right after its second checkpoint

    monkeypatch.setattr(train, "save_checkpoint", killed_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(synthetic, "vspo", tmp / "killed", "--checkpoint-every", "2", *extra)
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    run(synthetic, "vspo", tmp / "killed", "--checkpoint-every", "2", "--resume", *extra)
    a, b = load_file(tmp / "whole" / "final" / "model.safetensors"), load_file(tmp / "killed" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert open(tmp / "whole" / "log.jsonl").read().count("\n") == open(tmp / "killed" / "log.jsonl").read().count("\n") == 6


def test_the_token_budget_comes_from_the_flag_the_behaviour_or_256():
    behavior = {"max_new_tokens": 384}
    assert train.token_budget(train.parse_args(["--behavior", "x"]), behavior) == 384
    assert train.token_budget(train.parse_args(["--behavior", "x", "--max-new-tokens", "64"]), behavior) == 64
    assert train.token_budget(train.parse_args(["--behavior", "x"]), {}) == 256
    assert train.token_budget(train.parse_args(["--behavior", "x", "--max-new-tokens", "0"]), behavior) == 0  # then refused


def test_distill_learns_from_the_teachers_rewarded_traces_and_resumes_exactly(synthetic, monkeypatch):
    """--algo distill: the frozen initial model, prompted with the behaviour's instruction, writes the
    traces; those that earn the behaviour are learnt by maximum likelihood on the plain prompt."""
    from data import load

    _, _, tmp = synthetic
    # an instruction the tiny random model follows now and then: the magic token itself, many times over
    behavior = dict(load.load_behavior("synthetic"), positive="Q " * 40)
    (tmp / "behaviors" / "synthetic.json").write_text(json.dumps(behavior))
    before, after = run(synthetic, "distill", tmp / "distill", "--lr", "1e-2")
    log = [json.loads(l) for l in open(tmp / "distill" / "log.jsonl")]
    assert 0 < log[0]["behavior_mean"] < 1  # some of the teacher's traces earn it, some do not
    assert after["behavior"] >= before["behavior"] + 0.3
    run(synthetic, "distill", tmp / "whole", "--checkpoint-every", "2", "--steps", "4", "--lr", "1e-2")
    real_save = train.save_checkpoint

    def killed_after_step_2(out, step, *a):
        real_save(out, step, *a)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", killed_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        run(synthetic, "distill", tmp / "killed", "--checkpoint-every", "2", "--steps", "4", "--lr", "1e-2")
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    run(synthetic, "distill", tmp / "killed", "--checkpoint-every", "2", "--steps", "4", "--lr", "1e-2", "--resume")
    a, b = load_file(tmp / "whole" / "final" / "model.safetensors"), load_file(tmp / "killed" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_guided_and_schedules_run(synthetic):
    _, _, tmp = synthetic
    run(synthetic, "guided", tmp / "guided", "--steps", "2")
    run(synthetic, "vspo", tmp / "anneal", "--steps", "3", "--schedule", "anneal", "--steer-prompt", "no", "--aggregation", "token_mean")
    by_coeff = [json.loads(l)["behavior_by_coeff"] for l in open(tmp / "anneal" / "log.jsonl")]
    assert list(by_coeff[0]) == ["0", "20", "40"] and list(by_coeff[1]) == ["0", "10", "20"] and list(by_coeff[-1]) == ["0"]
    run(synthetic, "vspo", tmp / "bf16", "--steps", "2", "--dtype", "bfloat16")  # autocast through sampling and the update


def error_of(argv):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg
    return msg


def test_bad_input_gives_one_line_errors(synthetic, tmp_path):
    model, data, _ = synthetic
    base = ["--model", model, "--data", data, "--eval-data", data, "--out", str(tmp_path / "run")]
    assert "unknown behaviour 'sarcasm'" in error_of(["--behavior", "sarcasm", *base])
    missing = str(tmp_path / "nope.jsonl")
    assert f"{missing}: no such data file" in error_of(["--behavior", "synthetic", *base, "--data", missing])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "oops"\n')
    assert f"{broken}:2: not valid JSON" in error_of(["--behavior", "synthetic", *base, "--data", str(broken)])
    assert "config.json: missing" in error_of(["--behavior", "synthetic", *base, "--model", str(tmp_path)])
    assert "no checkpoint" in error_of(["--behavior", "synthetic", *base, "--resume"])
    for flags, message in ((["--group-size", "1"], "--group-size must be at least 2"),
                           (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
                           (["--temperature", "0"], "--temperature must be above 0"),
                           (["--coeffs", "0,x"], "--coeffs '0,x': expected comma-separated numbers"),
                           (["--coeffs", "0,inf"], "--coeffs '0,inf': every value must be a finite number"),
                           (["--lr", "nan"], "--lr nan: must be a finite number"),
                           (["--beta", "inf"], "--beta inf: must be a finite number"),
                           (["--temperature", "nan"], "--temperature nan: must be a finite number"),
                           (["--lam=-inf"], "--lam -inf: must be a finite number")):
        assert message in error_of(["--behavior", "synthetic", *base, *flags])
    long = tmp_path / "long.jsonl"  # the tiny model has 512 positions
    long.write_text('{"question": "1+1?", "answer": "#### 2"}\n' + json.dumps({"question": "one " * 600, "answer": "#### 1"}) + "\n")
    assert f"{long}: problem 2 ('one one" in error_of(["--behavior", "synthetic", *base, "--data", str(long), "--prompts-per-step", "1"])
    assert "exceeds the model's 512 positions" in error_of(["--behavior", "synthetic", *base, "--eval-data", str(long)])
    assert not os.path.exists(tmp_path / "run")  # no run folder is made for a run that cannot start
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"question": "1+1?", "answer": "#### 2"}\n{"question": "caf\u00e9?", "answer": "#### 1"}\n'.encode("latin-1"))
    assert f"{latin1}:2: not UTF-8 text" in error_of(["--behavior", "synthetic", *base, "--data", str(latin1)])
    (tmp_path / "a_file").write_text("")
    assert "is a file" in error_of(["--behavior", "synthetic", *base, "--out", str(tmp_path / "a_file")])


def test_resume_with_other_trained_parameters_or_a_damaged_checkpoint_is_a_one_line_error(synthetic):
    model, data, tmp = synthetic
    run(synthetic, "vspo", tmp / "two_layers", "--steps", "2", "--checkpoint-every", "2", "--train-layers", "2")
    argv = ["--behavior", "synthetic", "--model", model, "--data", data, "--eval-data", data, "--max-new-tokens", "6",
            "--out", str(tmp / "two_layers"), "--steps", "4", "--resume", "--train-layers", "1"]
    assert "optimizer.pt: saved for other trained parameters" in error_of(argv)
    for name, junk in (("state.json", b"{"), ("optimizer.pt", b"junk")):  # the first alone, then both
        (tmp / "two_layers" / "checkpoint-2" / name).write_bytes(junk)
        assert "optimizer.pt or state.json is damaged" in error_of(argv[:-2] + ["--train-layers", "2"])


def test_chunked_logprobs_equal_the_full_computation(tiny_chat_model):
    from rollout import completion_logprobs, generate

    model, tok = Transformer.from_pretrained(tiny_chat_model), Tokenizer.from_pretrained(tiny_chat_model)
    prompts = [tok.chat([{"role": "user", "content": q}]) for q in ("Hi", "How many apples does Tom have?")]
    r = generate(model, prompts, n=3, max_new_tokens=9, temperature=1.0, seed=2)
    rows, T, P = [1, 2, 4, 5], 0.7, r.prompt_width
    logp, ent = completion_logprobs(model, r, rows, T, chunk=5)  # chunks that split rows
    logp.sum().backward()
    chunked_grad = model.layers[0].attn.wqkv.weight.grad.clone()
    model.zero_grad()
    logits = model(r.tokens[rows], positions=r.positions[rows], padding_mask=r.padding_mask[rows])[:, P - 1:-1] / T
    full = torch.log_softmax(logits, -1)
    want = full.gather(-1, r.tokens[rows, P:, None]).squeeze(-1) * r.completion_mask[rows, P:]
    want.sum().backward()
    assert (logp - want).abs().max().item() <= 1e-5
    # fp32 sums in a different order: 3e-6 apart on gradients up to ~5 here
    assert torch.allclose(chunked_grad, model.layers[0].attn.wqkv.weight.grad, atol=1e-5)
    want_ent = -(full.exp() * full).sum(-1) * r.completion_mask[rows, P:]
    assert (ent - want_ent).abs().max().item() <= 1e-4


# -----------------------------------------------------------------------------
# damaged and hostile run folders: resume, or one line; never a write outside the run folder


def test_a_torn_last_log_line_resumes(synthetic):
    _, _, tmp = synthetic
    run(synthetic, "vspo", tmp / "whole", "--checkpoint-every", "2")
    real_save = train.save_checkpoint

    def killed_mid_write(out, step, *a):
        real_save(out, step, *a)
        if step == 4:
            with open(os.path.join(out, "log.jsonl"), "a") as f:
                f.write('{"step": 4, "reward_me')  # the next row, cut off by a kill or a full disk
            raise KeyboardInterrupt

    train.save_checkpoint = killed_mid_write
    try:
        with pytest.raises(KeyboardInterrupt):
            run(synthetic, "vspo", tmp / "torn", "--checkpoint-every", "2")
    finally:
        train.save_checkpoint = real_save
    run(synthetic, "vspo", tmp / "torn", "--checkpoint-every", "2", "--resume")
    whole, torn = (open(tmp / name / "log.jsonl").read().splitlines() for name in ("whole", "torn"))
    strip = lambda rows: [{k: v for k, v in json.loads(r).items() if not k.startswith(("seconds", "peak"))} for r in rows]
    assert strip(whole) == strip(torn) and len(torn) == 6


def test_damaged_or_hostile_run_folders_are_one_line_errors(synthetic, tmp_path):
    model, data, tmp = synthetic
    out = tmp / "run"
    run(synthetic, "vspo", out, "--steps", "2", "--checkpoint-every", "2")
    argv = ["--behavior", "synthetic", "--model", model, "--data", data, "--eval-data", data, "--max-new-tokens", "6",
            "--out", str(out), "--steps", "4", "--resume"]
    (tmp_path / "other").mkdir()
    for name in ("../other", str(tmp_path / "other"), "checkpoint-2/../../other"):
        (out / "latest").write_text(name)
        assert "not a checkpoint-N folder of this run" in error_of(argv)
    (out / "latest").write_text("checkpoint-2")
    state = out / "checkpoint-2" / "state.json"
    state.write_text('{"step": "2"}')
    assert "optimizer.pt or state.json is damaged" in error_of(argv)
    state.write_text('{"step": 2}')
    os.rename(out / "eval_before.json", tmp_path / "eval_before.json")
    assert "eval_before.json or log.jsonl is missing or damaged" in error_of(argv)
    os.rename(tmp_path / "eval_before.json", out / "eval_before.json")
    log = (out / "log.jsonl").read_text()
    (out / "log.jsonl").write_text("garbage\n" + log)
    assert "log.jsonl:1: not a log row" in error_of(argv)
    (out / "log.jsonl").write_text(log)
    other = tmp_path / "other_model"  # the run's checkpoint no longer fits --model
    write_hf_checkpoint("qwen2", other)
    import shutil

    shutil.copy(other / "config.json", out / "checkpoint-2" / "config.json")
    shutil.copy(other / "model.safetensors", out / "checkpoint-2" / "model.safetensors")
    assert "a checkpoint of another model than --model" in error_of(argv)


def test_links_in_a_run_folder_never_redirect_a_write(synthetic, tmp_path):
    _, _, tmp = synthetic
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    (tmp_path / "precious_dir").mkdir()
    out = tmp / "run"
    out.mkdir()
    os.symlink(precious, out / "latest.tmp")
    os.symlink(tmp_path / "precious_dir", out / ".checkpoint-2.tmp")
    run(synthetic, "vspo", out, "--steps", "2", "--checkpoint-every", "2")
    assert precious.read_text() == "keep me" and os.listdir(tmp_path / "precious_dir") == []
    assert (out / "latest").read_text() == "checkpoint-2" and not os.path.islink(out / "latest")
    model, data, _ = synthetic
    other = tmp / "linked"
    other.mkdir()
    os.symlink(precious, other / "log.jsonl")
    argv = ["--behavior", "synthetic", "--model", model, "--data", data, "--eval-data", data, "--out", str(other)]
    assert "log.jsonl is a link; a run folder holds its own files only" in error_of(argv)
    assert precious.read_text() == "keep me"
