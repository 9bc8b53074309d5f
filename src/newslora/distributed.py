"""Several processes: a run launched by ``torchrun`` or ``accelerate launch`` (data-parallel, the Trainer's DDP path).

Every process builds the same recipe, data and model, and the Trainer splits each global batch between them and
averages their gradients. What newslora adds around the Trainer is here: the process group is set up (through
accelerate, as the Trainer sets it up) before the run folder is chosen, so that rank 0 alone chooses, creates and
writes the run folder and the other ranks are told its path; small results are shared from rank 0; caches are
filled by one process per machine first. Without a launcher (no ``WORLD_SIZE`` > 1 in the environment) every
function here is a no-op for a single process, and nothing imports torch.distributed.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any

from .errors import NewsloraError


def launched() -> bool:
    """Whether this process is one of several started by a launcher (torchrun sets ``WORLD_SIZE``)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def init() -> None:
    """Join the process group when launched (gloo on CPU, NCCL on CUDA: accelerate's choice, the one the Trainer
    makes). The Trainer's TrainingArguments later find the group already up and use it."""
    if not launched():
        return
    import torch
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available())


def active() -> bool:
    """Whether a process group of more than one process is up."""
    if not launched():
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    if not active():
        return 0
    import torch.distributed as dist

    return dist.get_rank()


def world_size() -> int:
    if not active():
        return 1
    import torch.distributed as dist

    return dist.get_world_size()


def is_main() -> bool:
    """Rank 0, the one process that writes the run folder and prints (True without a launcher)."""
    return rank() == 0


def share(make) -> Any:
    """``make()`` run on rank 0 only, its result handed to every rank. A :class:`NewsloraError` raised by ``make``
    on rank 0 is raised on every rank, so that no rank waits for a result that never comes."""
    if not active():
        return make()
    import torch.distributed as dist

    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", make())
        except NewsloraError as e:
            box[0] = ("error", str(e))
        except BaseException as e:
            box[0] = ("error", f"rank 0 failed: {type(e).__name__}: {e}")
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise NewsloraError(value)
    return value


def on_main(do) -> None:
    """``do()`` run on rank 0 only, the other ranks waiting for it. An error it raises is raised on every rank (as
    :func:`share`: a :class:`NewsloraError` with rank 0's message on the others), so that no rank waits at a later
    barrier for a rank that stopped. ``do`` keeps what it makes itself: nothing is handed to the other ranks."""

    def done() -> None:
        do()

    share(done)


def barrier() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier()


@contextmanager
def local_main_first():
    """The block runs on each machine's first process before the others (which then find what it cached)."""
    if not active():
        yield
        return
    from accelerate import PartialState

    with PartialState().local_main_process_first():
        yield


def all_sum(values: list, device=None) -> list[float]:
    """Element-wise sum of ``values`` (numbers or 0-d tensors) over all ranks; the values themselves without a
    process group. ``device``: where the reduction runs (a CUDA device under NCCL)."""
    import torch

    t = torch.stack([v.detach().double().reshape(()).to(device) if torch.is_tensor(v)
                     else torch.tensor(float(v), dtype=torch.float64, device=device) for v in values])
    if active():
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()
