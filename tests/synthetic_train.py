"""train.py on the tests' synthetic behaviour, in a process of its own (plain python, or torchrun):

    torchrun --nproc_per_node 2 tests/synthetic_train.py TMP [train.py flags]

TMP is the folder the `synthetic` fixture made (behaviors/, vectors/). Every call to the sampler is
recorded to TMP/rollouts-<tag>-rank<R>.jsonl as {seed, row id: completion}, so that tests can compare
the rollouts of two runs. KILL_AFTER_CHECKPOINT=N makes the run die right after saving step N."""

import json
import os
import sys

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import data.load  # noqa: E402
import rewards  # noqa: E402
import steer  # noqa: E402
import train  # noqa: E402
from conftest import synthetic_reward  # noqa: E402

tmp, argv = sys.argv[1], sys.argv[2:]
data.load.BEHAVIOR_DIR, steer.VECTOR_DIR = os.path.join(tmp, "behaviors"), os.path.join(tmp, "vectors")
rewards.REWARDS["synthetic"] = synthetic_reward
record = os.path.join(tmp, f"rollouts-{os.environ.get('TAG', 'run')}-rank{os.environ.get('RANK', '0')}.jsonl")
real_generate, real_save = train.generate, train.save_checkpoint


def recording_generate(model, prompts, seed=0, row_ids=None, **kw):
    r = real_generate(model, prompts, seed=seed, row_ids=row_ids, **kw)
    with open(record, "a") as f:
        for i, row in enumerate(row_ids):
            f.write(json.dumps({"seed": seed, "row": row, "completion": r.completion(i)}) + "\n")
    return r


def save_then_maybe_die(out, step, *args):
    real_save(out, step, *args)
    if step == int(os.environ.get("KILL_AFTER_CHECKPOINT", -1)):
        os._exit(3)  # as a kill would: no clean-up, no process-group shutdown


train.generate, train.save_checkpoint = recording_generate, save_then_maybe_die
train.main(argv)
