"""
Several processes with torch.distributed: what train.py needs to run under torchrun, and nothing more.

    torchrun --nproc_per_node 8 train.py --behavior verbosity --model DIR --device cuda --dtype bfloat16
    torchrun --nproc_per_node 8 train.py ... --fsdp        # parameters, gradients, optimizer state sharded
    python train.py --behavior verbosity                   # one process: torch.distributed is never set up

How one step splits over W processes (train.py):
  - rank r takes prompts [r P/W, (r+1) P/W) of the step's P prompts, with all G rollouts of each, so a
    group never straddles two ranks, and samples them under their global row ids: each row's random
    numbers depend only on (seed, step, row, position) (rollout.row_uniforms), so the W processes
    sample exactly the rollouts that one process samples;
  - the loss is divided by the normaliser of the whole batch (`all_sum` of the ranks' shares) and
    multiplied by W, because DDP and FSDP *average* gradients over ranks: the average of W such
    gradients is the one-process gradient;
  - per-row results are gathered to every rank, so the log row is computed as one process does;
  - rank 0 alone writes (log, checkpoints, final model, plot) and extracts the steering vectors.
DDP keeps a whole copy of the model on each rank; FSDP2 (`fully_shard` per block and on the whole
policy) keeps 1/W of the parameters, gradients and AdamW state, and gathers the weights for
sampling (`full_weights`).
"""

import contextlib
import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    fsdp: bool = False
    device: str = "cpu"

    @property
    def master(self):
        return self.rank == 0


def setup(device, fsdp, prompts_per_step):
    """-> (Dist, this rank's device). Under torchrun (WORLD_SIZE, RANK, LOCAL_RANK set) initialise the
    process group: NCCL on CUDA, gloo on the CPU; each rank uses the GPU of its LOCAL_RANK. A bad setup
    is a ValueError with a one-line message, raised before anything is initialised."""
    if "WORLD_SIZE" not in os.environ:
        if fsdp:
            raise ValueError("--fsdp shards the model across processes: run under torchrun (torchrun "
                             "--nproc_per_node N train.py ... --fsdp)")
        return Dist(device=device), device
    world, rank, local_rank = launcher_env()
    if prompts_per_step % world:
        raise ValueError(f"--prompts-per-step {prompts_per_step} does not divide by the {world} processes: "
                         f"each process takes whole groups; pass a multiple of {world}")
    # torchrun (and its elastic agent) sets these; without them init_process_group would wait for peers
    # that were never started, silently, until its timeout
    if "TORCHELASTIC_RUN_ID" not in os.environ or not all(k in os.environ for k in ("MASTER_ADDR",
                                                                                      "MASTER_PORT")):
        raise ValueError(f"WORLD_SIZE={world} is set, but this process was not started by torchrun: run "
                         "torchrun --nproc_per_node N train.py ..., or unset WORLD_SIZE, RANK and LOCAL_RANK")
    import torch.distributed as dist

    if torch.device(device).type == "cuda":
        if not torch.cuda.is_available() or not dist.is_nccl_available():
            raise ValueError("--device cuda under torchrun needs NCCL and a CUDA build of torch, and this "
                             "one has neither; run on the CPU (--device cpu, gloo) or install the CUDA build")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return Dist(rank, world, local_rank, fsdp, device), device


def launcher_env():
    """(WORLD_SIZE, RANK, LOCAL_RANK) from the environment, checked: whole numbers, at least one
    process, and this process's rank among them. -> a one-line ValueError that says to use torchrun."""
    values = []
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        text = os.environ.get(key)
        if text is None or not text.strip().isdigit():
            shown = text if text is not None else "(unset)"
            raise ValueError(f"{key}={shown}: torchrun sets WORLD_SIZE, RANK and LOCAL_RANK to whole "
                             "numbers; launch with torchrun --nproc_per_node N train.py ..., or unset "
                             "WORLD_SIZE for one process")
        values.append(int(text))
    world, rank, local_rank = values
    if world < 1 or rank >= world or local_rank >= world:
        raise ValueError(f"WORLD_SIZE={world}, RANK={rank}, LOCAL_RANK={local_rank}: a rank must be below "
                         "the number of processes; launch with torchrun --nproc_per_node N train.py ...")
    return world, rank, local_rank


def teardown():
    if is_distributed():
        torch.distributed.destroy_process_group()


def is_distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def wrap(policy, d):
    """The module whose forward the loss runs through: DDP(policy), or policy sharded by FSDP2 (each
    block, then the whole, so that one block's weights are gathered at a time), or policy itself."""
    if not is_distributed():
        return policy
    if d.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in policy.model.layers:
            fully_shard(block)
        return fully_shard(policy)
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(d.device).index] if torch.device(d.device).type == "cuda" else None
    return DistributedDataParallel(policy, device_ids=ids, broadcast_buffers=False)  # RoPE's are constants


def _fsdp_modules(policy):
    from torch.distributed.fsdp import FSDPModule

    return [m for m in policy.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def full_weights(policy):
    """Inside this block the model holds whole weights, as the sampler needs. Under FSDP2 every block is
    gathered once, before sampling, and stays gathered through all decode steps, then is sharded again.
    The plain equivalent is FSDP's own gather in each block's forward, which would gather every block
    again for every decoded token. Elsewhere it does nothing."""
    modules = _fsdp_modules(policy) if is_distributed() else []
    # the root stays gathered from forward to backward anyway
    blocks = [m for m in modules if m is not policy]
    try:
        for m in modules:
            m.unshard()
        if modules:  # the gather rewrote the weights behind their version counters
            policy.model.drop_packed()
        for m in blocks:
            m.set_reshard_after_forward(False, recurse=False)
        yield
    finally:
        for m in blocks:
            m.set_reshard_after_forward(True, recurse=False)
        for m in modules:
            m.reshard()


def gradient_sync(policy, last):
    """The context of one micro-batch's backward: micro-batches before the last of an update only
    accumulate gradients on their rank; the last one reduces them across ranks."""
    if not is_distributed():
        return contextlib.nullcontext()
    if _fsdp_modules(policy):
        policy.set_requires_gradient_sync(last)  # FSDP2's switch, for every sharded module below it
        return contextlib.nullcontext()
    return contextlib.nullcontext() if last else policy.no_sync()


def all_sum(x, d):
    """A number summed over ranks (itself in one process)."""
    if not is_distributed():
        return x
    t = torch.tensor(float(x), dtype=torch.float64, device=d.device)  # NCCL reduces GPU tensors only
    torch.distributed.all_reduce(t)
    return t.item()


def gather(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] in one process)."""
    if not is_distributed():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast(obj):
    """Rank 0's obj on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def on_master(fn, d, errors=(ValueError, OSError), raise_as=ValueError):
    """fn() run by rank 0 alone, its result on every rank. If it fails with one of `errors`, every rank
    raises the same one-line `raise_as` error: the others would otherwise wait in their next
    collective, for a result that never comes. In one process: fn()."""
    if not is_distributed():
        try:
            return fn()
        except errors as e:
            raise raise_as(str(e)) from None
    result = error = None
    if d.master:
        try:
            result = fn()
        except errors as e:
            error = str(e)
    error, result = broadcast((error, result))
    if error is not None:
        raise raise_as(error)
    return result


def barrier():
    if is_distributed():
        torch.distributed.barrier()


def state_dicts(model, optimizer, d):
    """-> (model state, optimizer state) of the whole model on rank 0, in one process's layout (keyed
    by parameter name), so a run saved with N processes, with or without FSDP, resumes with M. Under
    FSDP every rank must call it (the shards are gathered); other ranks get empty dicts."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    if d.fsdp and is_distributed():
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(model, options=options),
                get_optimizer_state_dict(model, optimizer, options=options))
    return model.state_dict(), get_optimizer_state_dict(model, optimizer)


def load_optimizer_state(model, optimizer, state, d):
    """The inverse of state_dicts for the optimizer: every rank passes the whole saved state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True) if d.fsdp and is_distributed() else None
    set_optimizer_state_dict(model, optimizer, state, options=options)
