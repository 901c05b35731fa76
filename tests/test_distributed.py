"""train.py under torchrun (two processes, gloo on the CPU) against one process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from test_train import error_of

HERE = os.path.dirname(os.path.abspath(__file__))
NOISE = ("seconds_sample", "seconds_update", "peak_rss_gb")  # the log's fields that are not results


def launch(synthetic, out, *flags, procs=1, tag="run", env=None):
    """tests/synthetic_train.py in new processes: plain python for one process, torchrun for several."""
    model, data, tmp = synthetic
    args = [str(tmp), "--behavior", "synthetic", "--model", model, "--data", data, "--eval-data", data, "--steps", "4",
            "--prompts-per-step", "2", "--group-size", "6", "--coeffs", "0,20,40", "--max-new-tokens", "6",
            "--temperature", "1.0", "--lr", "3e-3", "--eval-n", "12", "--eval-every", "2", "--micro-batch", "5",
            "--checkpoint-every", "2", "--seed", "0", "--out", str(tmp / out), *flags]
    script = os.path.join(HERE, "synthetic_train.py")
    cmd = [sys.executable, script] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                      str(procs), "--standalone", script]
    # rows of many lengths: the logged token means must not depend on how rows split over processes
    env = {**os.environ, "TAG": tag, "OMP_NUM_THREADS": "1", "STOP_EVERY": "7", "XDG_CACHE_HOME": str(tmp / "cache"),
           **(env or {})}
    return subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=240)


def rollouts(tmp, tag):
    """{(seed, global row id): its completions, in order} over every sampler call of a run and all its
    processes (evaluations sample the same seed and rows again, after each stretch of training)."""
    out = {}
    for name in os.listdir(tmp):
        if name.startswith(f"rollouts-{tag}-rank"):
            mine = {}
            for line in open(tmp / name):
                r = json.loads(line)
                mine.setdefault((r["seed"], r["row"]), []).append(r["completion"])
            assert not mine.keys() & out.keys()  # each row is sampled by one process only
            out.update(mine)
    return out


def without_timing(metrics):
    return {k: v for k, v in metrics.items() if k != "seconds"}


def log_rows(path):
    rows = [{k: v for k, v in json.loads(line).items() if k not in NOISE} for line in open(path)]
    return [dict(row, eval=without_timing(row["eval"])) if "eval" in row else row for row in rows]


def assert_same_run(tmp, one, two, eval_n=12):
    samples = rollouts(tmp, one)
    assert samples == rollouts(tmp, two) and sum(map(len, samples.values())) == 4 * 12 + 3 * eval_n  # steps, evals
    a, b = log_rows(tmp / one / "log.jsonl"), log_rows(tmp / two / "log.jsonl")
    assert len(a) == len(b) == 4
    assert max(r["length_max"] - r["length_mean"] for r in a) > 0.5  # rows of different lengths
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:  # the same rollouts and rewards; losses and norms summed in another order
            assert x[k] == pytest.approx(y[k], abs=1e-5), k
    wa, wb = load_file(tmp / one / "final" / "model.safetensors"), load_file(tmp / two / "final" / "model.safetensors")
    # gradients summed in another order (rows grouped by length on each rank): rounding, through 4 AdamW steps
    assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 5e-5
    assert without_timing(json.load(open(tmp / one / "eval_after.json"))) == without_timing(
        json.load(open(tmp / two / "eval_after.json")))


def test_two_processes_give_the_one_process_run(synthetic):
    _, _, tmp = synthetic
    for procs, tag in ((1, "one"), (2, "two")):
        done = launch(synthetic, tag, procs=procs, tag=tag)
        assert done.returncode == 0, done.stderr[-2000:]
    assert_same_run(tmp, "one", "two")
    # sampling and evaluation run without autograd, so DDP prepares no gradient reduction for them
    assert not any(json.loads(line)["grad"] for name in os.listdir(tmp) if name.startswith("rollouts-two")
                   for line in open(tmp / name))
    assert "before training" in done.stdout and done.stdout.count("before training") == 1  # rank 0 alone prints


def test_fsdp_gives_the_one_process_run_and_saves_a_model_transformers_loads(synthetic):
    import transformers

    _, _, tmp = synthetic
    flags = ("--train-layers", "0", "--aggregation", "token_mean")  # every weight trained, the tied embedding too
    for procs, tag, extra in ((1, "one", ()), (2, "fsdp", ("--fsdp",))):
        done = launch(synthetic, tag, *flags, *extra, procs=procs, tag=tag)
        assert done.returncode == 0, done.stderr[-2000:]
    assert_same_run(tmp, "one", "fsdp")
    x = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = [transformers.AutoModelForCausalLM.from_pretrained(tmp / tag / "final").eval()(x).logits for tag in ("one", "fsdp")]
    assert (logits[0] - logits[1]).abs().max().item() <= 1e-4


def test_a_two_process_run_resumes_with_one(synthetic):
    _, _, tmp = synthetic
    done = launch(synthetic, "whole", tag="whole")
    assert done.returncode == 0, done.stderr[-2000:]
    killed = launch(synthetic, "killed", procs=2, tag="killed", env={"KILL_AFTER_CHECKPOINT": "2"})
    assert killed.returncode != 0 and os.path.isfile(tmp / "killed" / "checkpoint-2" / "optimizer.pt")
    done = launch(synthetic, "killed", "--resume", tag="resumed")
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = log_rows(tmp / "whole" / "log.jsonl"), log_rows(tmp / "killed" / "log.jsonl")
    assert [r["reward_mean"] for r in a] == pytest.approx([r["reward_mean"] for r in b], abs=1e-6)
    wa, wb = load_file(tmp / "whole" / "final" / "model.safetensors"), load_file(tmp / "killed" / "final" / "model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 5e-5


def test_bad_distributed_setups_are_one_line_errors(synthetic, monkeypatch):
    model, data, tmp = synthetic
    argv = ["--behavior", "synthetic", "--model", model, "--data", data, "--eval-data", data, "--out", str(tmp / "run")]
    assert "--fsdp shards the model across processes: run under torchrun" in error_of(argv + ["--fsdp"])
    for key, value in (("WORLD_SIZE", "3"), ("RANK", "0"), ("LOCAL_RANK", "0")):  # as torchrun sets them
        monkeypatch.setenv(key, value)
    assert "--prompts-per-step 4 does not divide by the 3 processes" in error_of(argv)
    assert "not started by torchrun: run torchrun --nproc_per_node N" in error_of(argv + ["--prompts-per-step", "3"])
    if not torch.cuda.is_available():
        for key, value in (("TORCHELASTIC_RUN_ID", "x"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29555")):
            monkeypatch.setenv(key, value)
        assert "needs NCCL and a CUDA build of torch" in error_of(argv + ["--prompts-per-step", "3", "--device", "cuda"])
    assert not os.path.exists(tmp / "run")


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2"}, "RANK=(unset): torchrun sets WORLD_SIZE, RANK and LOCAL_RANK to whole numbers"),
    ({"WORLD_SIZE": "abc", "RANK": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE=abc: torchrun sets"),
    ({"WORLD_SIZE": "0", "RANK": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE=0, RANK=0, LOCAL_RANK=0: a rank must be below"),
    ({"WORLD_SIZE": "1", "RANK": "3", "LOCAL_RANK": "0"}, "WORLD_SIZE=1, RANK=3, LOCAL_RANK=0: a rank must be below"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE=2 is set, but this process was not started by torchrun"),
])
def test_a_misused_environment_is_one_line_before_any_process_group(synthetic, monkeypatch, env, message):
    """Repros: a KeyError, a ZeroDivisionError, and silent hangs waiting for processes never started."""
    model, data, tmp = synthetic
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    argv = ["--behavior", "synthetic", "--model", model, "--data", data, "--eval-data", data, "--out", str(tmp / "run"),
            "--prompts-per-step", "2"]
    assert message in error_of(argv)
    assert not torch.distributed.is_initialized()


def test_an_error_on_rank_0_alone_reaches_every_rank(synthetic):
    """Rank 0 alone reads the steering vector; its error used to leave the others waiting in a collective."""
    done = launch(synthetic, "layer", "--layer", "99", procs=2, tag="layer")
    assert done.returncode != 0
    assert done.stderr.count("error: layer 99 is out of range") == 2, done.stderr[-2000:]  # one line per rank


def test_fsdp_with_uneven_evaluation_shares_and_a_nan_on_one_rank_gives_the_one_process_run(synthetic):
    """Repro: each rank gathered the weights once per evaluation batch, so ranks with more batches than
    others hung in an unmatched all-gather (11 problems in batches of 5: 2 batches on rank 0, 1 on rank
    1). The NaN loss on rank 1 alone at step 1 must skip that step on both ranks, as in one process."""
    _, _, tmp = synthetic
    flags = ("--train-layers", "0", "--eval-n", "11")
    for procs, tag, extra, rank in ((1, "one", (), "0"), (2, "uneven", ("--fsdp",), "1")):
        env = {"EVAL_BATCH": "5", "NAN_LOSS_SEED": "1", "NAN_RANK": rank}
        done = launch(synthetic, tag, *flags, *extra, procs=procs, tag=tag, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
    assert_same_run(tmp, "one", "uneven", eval_n=11)
    assert [r["skipped"] for r in log_rows(tmp / "uneven" / "log.jsonl")] == [False, True, False, False]
