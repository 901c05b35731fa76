"""train.py on the tests' synthetic behaviour, in a process of its own (plain python, or torchrun):

    torchrun --nproc_per_node 2 tests/synthetic_train.py TMP [train.py flags]

TMP is the folder the `synthetic` fixture made (behaviors/, vectors/). Every call to the sampler is
recorded to TMP/rollouts-<tag>-rank<R>.jsonl as {seed, row id: completion}, so that tests can compare
the rollouts of two runs. KILL_AFTER_CHECKPOINT=N makes the run die right after saving step N."""

import json
import os
import sys

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import torch  # noqa: E402

import data.load  # noqa: E402
import rewards  # noqa: E402
import steer  # noqa: E402
import train  # noqa: E402
from conftest import synthetic_reward  # noqa: E402

tmp, argv = sys.argv[1], sys.argv[2:]
data.load.BEHAVIOR_DIR, steer.VECTOR_DIR = os.path.join(tmp, "behaviors"), os.path.join(tmp, "vectors")
rewards.REWARDS["synthetic"] = synthetic_reward
record = os.path.join(tmp, f"rollouts-{os.environ.get('TAG', 'run')}-rank{os.environ.get('RANK', '0')}.jsonl")
real_generate, real_save, real_loss = train.generate, train.save_checkpoint, train.vspo.policy_loss
# STOP_EVERY=K: every K-th token id also ends a rollout, so that rows have many lengths
extra_stops = tuple(range(3, 400, int(os.environ["STOP_EVERY"]))) if "STOP_EVERY" in os.environ else ()
# NAN_LOSS_SEED=S: the loss is NaN in the update after the sampler call with seed S (on rank NAN_RANK only)
nan_seed, nan_rank = int(os.environ.get("NAN_LOSS_SEED", -1)), os.environ.get("NAN_RANK", "0")
train.EVAL_BATCH = int(os.environ.get("EVAL_BATCH", train.EVAL_BATCH))
train.bf16_speedup = lambda: float(os.environ.get("BF16_SPEEDUP", 0.0))  # --dtype auto: fp32 unless asked
train.PROBE_PAUSE = 0.0
last_seed = None


def recording_generate(model, prompts, seed=0, row_ids=None, stop_ids=(), **kw):
    global last_seed
    grad = torch.is_grad_enabled()  # as the policy's wrapper (DDP, FSDP) sees the call
    r = real_generate(model, prompts, seed=seed, row_ids=row_ids, stop_ids=tuple(stop_ids) + extra_stops, **kw)
    with open(record, "a") as f:
        for i, row in enumerate(row_ids):
            f.write(json.dumps({"seed": seed, "row": row, "completion": r.completion(i), "grad": grad}) + "\n")
    last_seed = seed
    return r


def nan_loss_on_one_rank(*a, **kw):
    loss, s = real_loss(*a, **kw)
    if last_seed == nan_seed and os.environ.get("RANK", "0") == nan_rank:
        loss = loss * float("nan")
    return loss, s


def save_then_maybe_die(out, step, *args):
    real_save(out, step, *args)
    if step == int(os.environ.get("KILL_AFTER_CHECKPOINT", -1)):
        os._exit(3)  # as a kill would: no clean-up, no process-group shutdown


train.generate, train.save_checkpoint = recording_generate, save_then_maybe_die
train.vspo.policy_loss = nan_loss_on_one_rank
train.main(argv)
