"""The workflow on several processes: torch.distributed, launched by torchrun.

    torchrun --standalone --nproc-per-node 2 -m linclass train --model twolayer --dataset digits

Two uses, both with results equal to the one-process run up to float rounding:
  - data parallel: every rank draws the same global minibatch (same seed), trains on its
    rows, and the gradients of all ranks are summed in one all-reduce per step, weighted
    by each rank's share of the rows, so each step is the one-process step on the whole
    minibatch (the all-reduce of gradient buckets that DDP does, for the two-layer net's
    hand-written backward);
  - a search spread over the ranks: configuration i runs on rank i mod K, the results
    are gathered, and every rank picks the same winner; its refit runs once, on rank 0
    with the threads of every rank on its node (on_main).
gloo on CPU, nccl on CUDA.  Without a process group everything here is the identity.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env(device: torch.device) -> bool:
    """Joins the process group torchrun describes (WORLD_SIZE > 1 in the environment)
    unless one exists; returns whether this process runs in a group of several."""
    if not dist.is_available():
        return False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        global _JOINED
        _JOINED = True
    return size() > 1


_JOINED = False  # whether init_from_env made the group (finish then leaves it)


def finish() -> None:
    """Leaves the process group init_from_env joined, once every rank got here (the end
    of a command); a group the caller made is left alone."""
    global _JOINED
    if _JOINED and dist.is_initialized():
        _JOINED = False
        dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def rank_rows(batch: int) -> slice:
    """This rank's rows of a global minibatch of `batch` rows (contiguous, sizes differ
    by at most one)."""
    k, n = rank(), size()
    if batch < n:
        raise ValueError(f"a minibatch of {batch} rows cannot be split over {n} processes")
    return slice(batch * k // n, batch * (k + 1) // n)


def allreduce_sum_(tensors: list) -> None:
    """Sums each tensor over the ranks in place, all in one collective (one flat bucket)."""
    if size() == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def my_share(items: list) -> list:
    """(index, item) of the items this rank runs: index mod K == rank."""
    return [(i, item) for i, item in enumerate(items) if i % size() == rank()]


def gather(obj) -> list:
    """Every rank's obj, in rank order (picklable objects)."""
    if size() == 1:
        return [obj]
    out = [None] * size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_(tensors: list, src: int) -> None:
    """Overwrites each tensor with rank src's."""
    if size() == 1:
        return
    for t in tensors:
        dist.broadcast(t, src)


def local_size() -> int:
    """How many ranks share this node (torchrun's LOCAL_WORLD_SIZE; 1 without it)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if size() > 1 else 1


def on_main(fn):
    """fn() run by rank 0 alone; its result (picklable: tensors in it on the CPU) is
    returned on every rank.  While the other ranks wait, rank 0 runs with their intra-op
    threads as well (torchrun gives each rank 1 by default), so the work runs as in one
    process on the node's cores: faster than every rank repeating it, and rounded the
    way the one-process run rounds where torch's matrix products depend on the thread
    count.  An exception in fn is raised on every rank, so none is left waiting."""
    if size() == 1:
        return fn()
    result = error = None
    if is_main():
        threads = torch.get_num_threads()
        torch.set_num_threads(threads * local_size())
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - sent to the other ranks, then raised
            error = e
        finally:
            torch.set_num_threads(threads)
    box = [(result, None if error is None else f"{type(error).__name__}: {error}")]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    result, message = box[0]
    if message is not None:
        raise RuntimeError(f"rank 0 failed: {message}")
    return result
