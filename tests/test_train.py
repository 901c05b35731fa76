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


def killed_after(monkeypatch, step, fn):
    """fn(), a run that dies right after it saves checkpoint-<step>, as a kill would."""
    real_save = train.save_checkpoint

    def save_then_die(out, k, *a):
        real_save(out, k, *a)
        if k == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        fn()
    monkeypatch.setattr(train, "save_checkpoint", real_save)


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
    killed_after(monkeypatch, 2, lambda: run(synthetic, "distill", tmp / "killed", "--checkpoint-every", "2",
                                             "--steps", "4", "--lr", "1e-2"))
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


# -----------------------------------------------------------------------------
# non-finite steps: skipped, never written into the weights, the optimizer or a checkpoint


def argv_of(synthetic, algo, out, *extra):
    model, data, _ = synthetic
    return ["--behavior", "synthetic", "--algo", algo, "--model", model, "--data", data, "--eval-data", data,
            "--steps", "4", "--prompts-per-step", "2", "--group-size", "6", "--coeffs", "0,20,40",
            "--max-new-tokens", "6", "--temperature", "1.0", "--lr", "3e-3", "--eval-n", "12", "--micro-batch", "5",
            "--seed", "0", "--out", str(out), *extra]


def finite_checkpoint(path):
    weights = load_file(os.path.join(path, "model.safetensors"))
    return all(torch.isfinite(t).all() for t in weights.values())


def test_a_non_finite_loss_is_skipped_leaving_weights_and_moments_untouched(synthetic, monkeypatch):
    _, _, tmp = synthetic
    states, real_save, real_loss = {}, train.save_checkpoint, train.vspo.policy_loss
    step = {"now": 0}

    def recording_save(out, k, model, optimizer, d, *rest):  # the weights and AdamW state after each step
        states[k] = ({n: p.detach().clone() for n, p in model.named_parameters()},
                     {i: {n: v.clone() for n, v in s.items()} for i, s in optimizer.state_dict()["state"].items()})
        step["now"] = k
        real_save(out, k, model, optimizer, d, *rest)

    def nan_at_step_1(logp, *a, **kw):
        loss, s = real_loss(logp, *a, **kw)
        return (loss * float("nan") if step["now"] == 1 else loss), s

    monkeypatch.setattr(train, "save_checkpoint", recording_save)
    monkeypatch.setattr(train.vspo, "policy_loss", nan_at_step_1)
    train.main(argv_of(synthetic, "vspo", tmp / "run", "--checkpoint-every", "1"))
    log = [json.loads(line) for line in open(tmp / "run" / "log.jsonl")]
    assert [r["skipped"] for r in log] == [False, True, False, False]
    assert log[1]["loss"] is None and log[1]["grad_norm"] is None  # JSON has no NaN: written as null
    (w1, m1), (w2, m2), (w3, _) = states[1], states[2], states[3]
    assert all(torch.equal(w1[n], w2[n]) for n in w1)  # the skipped step changed nothing
    assert all(torch.equal(m1[i][n], m2[i][n]) for i in m1 for n in m1[i])
    assert any(not torch.equal(w2[n], w3[n]) for n in w2)  # the next step trains again
    assert finite_checkpoint(tmp / "run" / "final")


def test_steps_that_stay_non_finite_stop_the_run_and_keep_the_last_good_checkpoint(synthetic):
    """Repro: --algo distill --lr 1e30. The first update leaves the weights near 1e30, every later loss is
    NaN; the run used to log NaN, write NaN checkpoints and die in the sampler."""
    _, _, tmp = synthetic
    behavior = json.loads((tmp / "behaviors" / "synthetic.json").read_text())
    (tmp / "behaviors" / "synthetic.json").write_text(json.dumps(dict(behavior, positive="Q " * 40)))
    msg = error_of(argv_of(synthetic, "distill", tmp / "run", "--lr", "1e30", "--steps", "8", "--checkpoint-every", "6"))
    assert "error: step 3: 3 steps in a row (to step 3) had a loss or gradient norm that is not finite" in msg
    assert "no checkpoint was written yet" in msg
    log = [json.loads(line) for line in open(tmp / "run" / "log.jsonl")]
    assert [r["skipped"] for r in log] == [False, True, True, True]
    assert not os.path.exists(tmp / "run" / "eval_after.json") and not os.path.exists(tmp / "run" / "final")


def test_a_diverged_update_is_never_checkpointed_and_the_run_resumes_from_the_last_good_one(synthetic, monkeypatch):
    """Repro: --lr 1e30. The weights become finite but near 1e30: they passed every load check, the
    rotation deleted the last good checkpoint, and every --resume died in the sampler."""
    _, _, tmp = synthetic
    real_adamw = torch.optim.AdamW

    class DivergesAtItsSecondStep(real_adamw):
        def step(self, *a, **kw):
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 2:
                for group in self.param_groups:
                    group["lr"] = 1e30
            return super().step(*a, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", DivergesAtItsSecondStep)
    argv = argv_of(synthetic, "vspo", tmp / "run", "--checkpoint-every", "1")  # steering: a gradient at once
    msg = error_of(argv)
    assert "step 1: the update diverged: the weights give non-finite logits" in msg
    assert f"{tmp / 'run' / 'checkpoint-1'} is kept" in msg
    assert (tmp / "run" / "latest").read_text() == "checkpoint-1" and finite_checkpoint(tmp / "run" / "checkpoint-1")
    assert sorted(n for n in os.listdir(tmp / "run") if n.startswith("checkpoint")) == ["checkpoint-1"]
    monkeypatch.setattr(torch.optim, "AdamW", real_adamw)
    train.main(argv + ["--resume"])  # from the kept checkpoint, to the end
    assert finite_checkpoint(tmp / "run" / "final") and len(open(tmp / "run" / "log.jsonl").readlines()) == 4
    # without a checkpoint in between, the sampler of the next step names the problem
    msg = error_of(argv_of(synthetic, "vspo", tmp / "no_checkpoint", "--lr", "1e30"))
    assert "model produced non-finite logits at step 1, row " in msg and "lower --lr" in msg


def test_a_reward_that_returns_nan_stops_the_run_and_keeps_the_last_checkpoint(synthetic, monkeypatch):
    import rewards

    _, _, tmp = synthetic
    broken = {"now": False}
    real_save = train.save_checkpoint

    def save_then_break_the_reward(out, k, *a):
        real_save(out, k, *a)
        broken["now"] = k == 2

    monkeypatch.setattr(train, "save_checkpoint", save_then_break_the_reward)
    monkeypatch.setitem(rewards.REWARDS, "synthetic", lambda p, c, ex: float("nan") if broken["now"] else 0.0)
    argv = argv_of(synthetic, "grpo", tmp / "run", "--checkpoint-every", "2")
    msg = error_of(argv)
    assert "error: step 2: behaviour reward 'synthetic' returned nan" in msg and "checkpoint-2 is kept" in msg
    assert finite_checkpoint(tmp / "run" / "checkpoint-2")
    monkeypatch.setitem(rewards.REWARDS, "synthetic", lambda p, c, ex: 0.0)  # the reward fixed
    train.main(argv + ["--resume"])
    assert finite_checkpoint(tmp / "run" / "final")


def test_a_checkpoint_whose_weights_overflow_is_named_before_training(synthetic, tmp_path):
    """Repro: q and k weights scaled by 1e20 load (they are finite), then overflow in attention."""
    import shutil

    from safetensors.torch import save_file

    model, data, _ = synthetic
    bad = tmp_path / "overflow"
    shutil.copytree(model, bad)
    weights = load_file(bad / "model.safetensors")
    for name in weights:
        if "q_proj" in name or "k_proj" in name:
            weights[name] = weights[name] * 1e20
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    msg = error_of(argv_of(synthetic, "grpo", tmp_path / "run") + ["--model", str(bad)])
    assert "model produced non-finite logits at the evaluation before training, row " in msg and "check --model" in msg


def test_logged_means_are_token_means_whatever_the_micro_batch_split(synthetic, monkeypatch):
    """Repro: entropy, clip_frac and kl were row-weighted means of micro-batch means, so --micro-batch (and
    the number of processes) changed the logged value; with rows of different lengths they must not."""
    _, _, tmp = synthetic
    real_generate = train.generate

    def frequent_stops(model, prompts, stop_ids=(), **kw):  # a seventh of the ids stop: rows of many lengths
        return real_generate(model, prompts, stop_ids=tuple(stop_ids) + tuple(range(3, 400, 7)), **kw)

    monkeypatch.setattr(train, "generate", frequent_stops)
    rows = {}
    for micro in ("5", "12"):
        train.main(argv_of(synthetic, "vspo", tmp / micro, "--steps", "1", "--micro-batch", micro, "--beta", "0.1",
                           "--updates-per-batch", "2"))
        rows[micro] = json.loads(open(tmp / micro / "log.jsonl").readline())
    assert rows["5"]["length_max"] > rows["5"]["length_mean"]  # rows of different lengths
    for key in ("entropy", "kl", "clip_frac", "loss"):
        assert rows["5"][key] == pytest.approx(rows["12"][key], rel=1e-5, abs=1e-7), key
    assert rows["5"]["kl"] > 0  # the second update moved away from the reference


def test_distill_refuses_the_flags_it_would_ignore(synthetic, tmp_path):
    for flags in (["--beta", "0.1"], ["--old-logprobs", "steered"]):
        assert "--algo distill is maximum likelihood" in error_of(argv_of(synthetic, "distill", tmp_path / "run", *flags))


def test_an_unwritable_out_fails_before_the_model_loads(synthetic, monkeypatch):
    def never(*a, **kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(train, "load_model_and_tokenizer", never)
    assert "--out /proc/vspo-run: cannot write there" in error_of(argv_of(synthetic, "vspo", "/proc/vspo-run"))


def test_a_budget_from_the_behaviour_is_named_as_such(synthetic):
    _, _, tmp = synthetic
    behavior = json.loads((tmp / "behaviors" / "synthetic.json").read_text())
    (tmp / "behaviors" / "synthetic.json").write_text(json.dumps(dict(behavior, max_new_tokens=600)))
    argv = argv_of(synthetic, "vspo", tmp / "run")
    del argv[argv.index("--max-new-tokens"):argv.index("--max-new-tokens") + 2]
    msg = error_of(argv)
    assert "with max_new_tokens 600 of the behaviour synthetic exceeds the model's 512 positions" in msg
    assert "--max-new-tokens" not in msg


def test_resume_checks_log_steps_and_names_a_lost_row(synthetic, capsys):
    _, _, tmp = synthetic
    train.main(argv_of(synthetic, "vspo", tmp / "run", "--steps", "2", "--checkpoint-every", "2"))
    resume = argv_of(synthetic, "vspo", tmp / "run", "--steps", "3", "--checkpoint-every", "2", "--resume")
    log = (tmp / "run" / "log.jsonl").read_text().splitlines()
    for bad, shown in (('"0"', "'0'"), ("null", "None")):
        (tmp / "run" / "log.jsonl").write_text(log[0].replace('"step": 0', f'"step": {bad}', 1) + "\n" + log[1] + "\n")
        assert f"log.jsonl:1: step {shown} is not a step number" in error_of(resume)
    # the row of step 1, torn by a power loss after checkpoint-2 was written: resumed, and said
    (tmp / "run" / "log.jsonl").write_text(log[0] + "\n" + log[1][:20])
    capsys.readouterr()
    train.main(resume)
    assert "has no row for step(s) 1" in capsys.readouterr().err
    assert [json.loads(line)["step"] for line in open(tmp / "run" / "log.jsonl")] == [0, 2]


def test_a_final_model_cut_short_is_not_a_finished_run(synthetic, monkeypatch):
    """eval_after.json is written last: a run folder that has it has its whole final model."""
    import errno

    from model import Transformer as T

    _, _, tmp = synthetic
    real_save = T.save_pretrained

    def disk_full_for_final(self, path, *a, **kw):
        if os.path.basename(path) == "final":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real_save(self, path, *a, **kw)

    monkeypatch.setattr(T, "save_pretrained", disk_full_for_final)
    argv = argv_of(synthetic, "vspo", tmp / "run", "--steps", "2", "--checkpoint-every", "2")
    msg = error_of(argv)
    assert "error: the evaluation after training: No space left on device" in msg and "checkpoint-2 is kept" in msg
    assert not os.path.exists(tmp / "run" / "eval_after.json")
    monkeypatch.setattr(T, "save_pretrained", real_save)
    train.main(argv + ["--resume"])  # nothing left to train: evaluates and saves
    assert os.path.isfile(tmp / "run" / "eval_after.json") and finite_checkpoint(tmp / "run" / "final")


def test_distill_logs_the_traces_it_keeps_and_warns_when_it_kept_none(synthetic, monkeypatch, capsys):
    """Repro: a behaviour no teacher trace earns left distill logging loss 0.0 at every step and
    'finishing' untrained without a word."""
    import rewards

    _, _, tmp = synthetic
    monkeypatch.setitem(rewards.REWARDS, "synthetic", lambda p, c, ex: 0.0)
    train.main(argv_of(synthetic, "distill", tmp / "none", "--steps", "2"))
    assert [json.loads(line)["kept_traces"] for line in open(tmp / "none" / "log.jsonl")] == [0, 0]
    assert "warning: no step kept a teacher trace" in capsys.readouterr().err
    monkeypatch.setitem(rewards.REWARDS, "synthetic", lambda p, c, ex: float(len(c.text) % 2))
    train.main(argv_of(synthetic, "distill", tmp / "some", "--steps", "2"))
    assert all(json.loads(line)["kept_traces"] > 0 for line in open(tmp / "some" / "log.jsonl"))
    assert "no step kept" not in capsys.readouterr().err


def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_older_one(synthetic, monkeypatch):
    import errno

    _, _, tmp = synthetic
    real_write = train.write_checkpoint

    def disk_full_at_step_2(out, step, *a):
        if step == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(out, step, *a)

    monkeypatch.setattr(train, "write_checkpoint", disk_full_at_step_2)
    msg = error_of(argv_of(synthetic, "vspo", tmp / "run", "--checkpoint-every", "1"))
    assert "error: step 1: writing checkpoint-2 failed (No space left on device)" in msg
    assert "checkpoint-1 is kept: fix the cause, then --resume" in msg and finite_checkpoint(tmp / "run" / "checkpoint-1")


def test_a_non_finite_second_update_is_reported_as_such(synthetic, monkeypatch, capsys):
    """With --updates-per-batch 2, each update is judged alone: the first was applied, the second not."""
    _, _, tmp = synthetic
    calls, real_loss = {"n": 0}, train.vspo.policy_loss

    def nan_in_the_second_update_of_step_1(logp, *a, **kw):  # 3 micro-batches of 5, 5 and 2 rows per update
        calls["n"] += 1
        loss, s = real_loss(logp, *a, **kw)
        return (loss * float("nan") if 10 <= calls["n"] <= 12 else loss), s

    monkeypatch.setattr(train.vspo, "policy_loss", nan_in_the_second_update_of_step_1)
    train.main(argv_of(synthetic, "vspo", tmp / "run", "--updates-per-batch", "2", "--steps", "3"))
    log = [json.loads(line) for line in open(tmp / "run" / "log.jsonl")]
    assert [(r["skipped"], r["skipped_in_a_row"]) for r in log] == [(False, 0), (True, 1), (False, 0)]
    err = capsys.readouterr().err
    assert "step 1 skipped" in err and "its first 1 update(s) were applied" in err


def test_dtype_auto_is_measured_once_per_machine_recorded_and_kept_on_resume(synthetic, monkeypatch, tmp_path):
    _, _, tmp = synthetic
    monkeypatch.setattr(train, "bf16_speedup", lambda: 0.9)  # bf16 slower here: fp32
    train.main(argv_of(synthetic, "grpo", tmp / "slow", "--steps", "1"))
    recorded = json.loads((tmp / "slow" / "args.json").read_text())
    assert recorded["dtype"] == "float32" and "bf16 matmul 0.90x fp32" in recorded["dtype_chosen_by"]
    fp32_gap = json.loads(open(tmp / "slow" / "log.jsonl").readline())["logprob_mismatch_mean"]
    assert fp32_gap < 1e-4  # in fp32 the sampler and the learner agree to rounding
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other_machine"))
    monkeypatch.setattr(train, "bf16_speedup", lambda: 2.5)  # native bf16: the sampler and update in bf16
    argv = argv_of(synthetic, "vspo", tmp / "fast", "--steps", "2", "--checkpoint-every", "1")
    train.main(argv)
    assert json.loads((tmp / "fast" / "args.json").read_text())["dtype"] == "bfloat16"
    log = [json.loads(line) for line in open(tmp / "fast" / "log.jsonl")]
    assert all(r["dtype"] == "bfloat16" for r in log)
    assert 1e-3 < log[0]["logprob_mismatch_mean"] < 0.2  # the bf16 sampler against the autocast learner

    def never():
        raise AssertionError("measured again")

    monkeypatch.setattr(train, "bf16_speedup", never)  # the machine's measurement is kept, not retaken
    train.main(argv_of(synthetic, "vspo", tmp / "again", "--steps", "1"))
    assert "kept in" in json.loads((tmp / "again" / "args.json").read_text())["dtype_chosen_by"]
    # a resumed run keeps its own dtype, whatever this machine would choose now
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "third_machine"))
    monkeypatch.setattr(train, "bf16_speedup", lambda: 0.5)
    (tmp / "fast" / "eval_after.json").unlink()
    train.main(argv_of(synthetic, "vspo", tmp / "fast", "--steps", "3", "--checkpoint-every", "1", "--resume"))
    assert [json.loads(line)["dtype"] for line in open(tmp / "fast" / "log.jsonl")] == ["bfloat16"] * 3


def test_rows_sorted_and_trimmed_into_micro_batches_give_the_plain_gradient(tiny_chat_model):
    """The update orders rows by length and computes each micro-batch at its own width (rollout.trimmed);
    the gradient of the summed loss equals the plain full-width one's to 1e-5 in fp32."""
    from rollout import completion_logprobs, generate

    model, tok = Transformer.from_pretrained(tiny_chat_model), Tokenizer.from_pretrained(tiny_chat_model)
    prompts = [tok.chat([{"role": "user", "content": q}]) for q in ("Hi", "How many apples does Tom have, in all?")]
    r = generate(model, prompts, n=4, max_new_tokens=12, temperature=1.0, seed=3, stop_ids=tuple(range(3, 400, 5)))
    lengths = r.completion_lens.tolist()
    assert len(set(lengths)) > 2  # rows of many lengths
    P, N = r.prompt_width, len(lengths)
    sign = torch.tensor([1.0, -1.0] * (N // 2))

    def grad_of(groups):
        model.zero_grad()
        for rows in groups:
            logp, _ = completion_logprobs(model, r, rows, 0.7)
            (logp * sign[rows, None]).sum().backward()  # advantages of both signs
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    order = sorted(range(N), key=lambda i: lengths[i])
    sorted_trimmed = grad_of([order[i:i + 3] for i in range(0, N, 3)])
    model.zero_grad()  # the plain computation: every row at the full width, no trimming
    logits = model(r.tokens, positions=r.positions, padding_mask=r.padding_mask)[:, P - 1:-1] / 0.7
    want = torch.log_softmax(logits, -1).gather(-1, r.tokens[:, P:, None]).squeeze(-1) * r.completion_mask[:, P:]
    (want * sign[:, None]).sum().backward()
    plain = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    # fp32 sums in another order: about 1e-6 relative to the largest gradient
    assert (sorted_trimmed - plain).abs().max().item() <= 1e-5 * plain.abs().max().item()


# -----------------------------------------------------------------------------
# issue 29's knobs on the tiny model: each logs what it did, and the adaptive schedule resumes exactly


def test_separate_normalization_soft_overlong_gate_and_adaptive_intensities_log_what_they_did(synthetic):
    import vspo

    _, _, tmp = synthetic
    train.main(argv_of(synthetic, "vspo", tmp / "run", "--reward-normalization", "separate", "--overlong", "soft",
                       "--overlong-window", "3", "--behavior-gate", "correct", "--schedule", "adaptive"))
    log = [json.loads(line) for line in open(tmp / "run" / "log.jsonl")]
    for row in log:
        share = row["advantage_share"]
        # shares of the advantages' magnitude: they sum to 1, or all are 0 in a step with no signal at all
        assert set(share) == {"accuracy", "behavior", "length"} and sum(share.values()) in (pytest.approx(1.0), 0)
        assert set(row["truncated_by_coeff"]) == set(row["behavior_by_coeff"]) == set(row["accuracy_by_coeff"])
    # no answer of the tiny model is correct, so neither accuracy nor the gated behaviour carries anything;
    # the length penalty carries everything once some rows end short of the budget (6 tokens), nothing while
    # every row is 6 long (-1 for all)
    for row in log:
        assert row["accuracy_mean"] == 0 and row["advantage_share"]["behavior"] == 0
        assert row["advantage_share"]["length"] == (0.0 if row["length_mean"] == 6 else pytest.approx(1.0))
    assert {r["length_mean"] == 6 for r in log} == {True, False}  # both cases occur
    # the intensities move as vspo.adapt_intensities says, from each step's outcome at each level
    start = log[0]["intensities"]
    assert start == [0.0, 20.0, 40.0]
    for now, then in zip(log, log[1:]):
        at = lambda key: [now[key][f"{c:g}"] for c in now["intensities"]]
        assert then["intensities"] == pytest.approx(
            vspo.adapt_intensities(now["intensities"], start, at("behavior_by_coeff"), at("truncated_by_coeff")))
    assert log[-1]["intensities"][2] < start[2]  # the rows overshoot the budget: the top level came down


def test_overlong_mask_leaves_rows_cut_off_by_the_budget_out_of_the_loss(synthetic):
    _, _, tmp = synthetic
    for flag in ("none", "mask"):
        train.main(argv_of(synthetic, "vspo", tmp / flag, "--overlong", flag, "--steps", "1"))
    plain, masked = (json.loads(open(tmp / flag / "log.jsonl").readline()) for flag in ("none", "mask"))
    assert plain["truncated_frac"] == masked["truncated_frac"] == 1.0  # the tiny model never stops in 6 tokens
    assert plain["grad_norm"] > 0 and masked["grad_norm"] == 0 and masked["loss"] == 0


def test_the_adaptive_schedule_resumes_exactly(synthetic, monkeypatch):
    _, _, tmp = synthetic
    flags = ("--schedule", "adaptive", "--checkpoint-every", "2", "--steps", "5")
    train.main(argv_of(synthetic, "vspo", tmp / "whole", *flags))
    killed_after(monkeypatch, 2, lambda: train.main(argv_of(synthetic, "vspo", tmp / "killed", *flags)))
    train.main(argv_of(synthetic, "vspo", tmp / "killed", *flags, "--resume"))
    levels = lambda name: [json.loads(line)["intensities"] for line in open(tmp / name / "log.jsonl")]
    assert levels("whole") == levels("killed") and len(set(map(tuple, levels("whole")))) > 1
    a, b = load_file(tmp / "whole" / "final" / "model.safetensors"), load_file(tmp / "killed" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((tmp / "killed" / "checkpoint-4" / "state.json").read_text()) if os.path.isdir(
        tmp / "killed" / "checkpoint-4") else json.loads((tmp / "killed" / "checkpoint-5" / "state.json").read_text())
    assert len(state["levels"]) == 3
    (tmp / "killed" / "eval_after.json").unlink()
    bad = tmp / "killed" / sorted(n for n in os.listdir(tmp / "killed") if n.startswith("checkpoint-"))[-1] / "state.json"
    bad.write_text(json.dumps({"step": 5}))
    assert "no intensities of --schedule adaptive" in error_of(argv_of(synthetic, "vspo", tmp / "killed", *flags,
                                                                       "--resume"))
