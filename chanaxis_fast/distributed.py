"""Calibration and sweeps over several processes with ``torch.distributed`` (``torchrun``).

A distributed calibration splits the loader's batches among the processes deterministically
(batch ``j`` goes to rank ``j % world``) without loading anyone else's images, draws the same
sampled positions for every image as one process would (the position stream is advanced over the
other ranks' images), and all-reduces every statistic at the end: channel statistics and SFVR
patch statistics exactly (Chan et al.), Taylor gradients and HRank/CHIP sums by summation. Every
rank returns the merged calibration; rank 0 writes the checkpoint. A distributed sweep gives each
rank the points ``i % world == rank`` and gathers them in the single-process order.
"""

import os
from typing import List, Optional, Tuple

import torch


def active(distributed: Optional[bool] = None) -> bool:
    """Whether to run distributed: ``distributed`` if given (True needs an initialised process
    group), else whether ``torch.distributed`` is initialised with more than one process."""
    import torch.distributed as dist

    ready = dist.is_available() and dist.is_initialized()
    if distributed is None:
        return ready and dist.get_world_size() > 1
    if distributed and not ready:
        from .errors import UserInputError

        raise UserInputError("distributed=True needs torch.distributed initialised "
                             "(torch.distributed.init_process_group, or run under torchrun)")
    return bool(distributed)


def rank_and_world() -> Tuple[int, int]:
    """(rank, world size), (0, 1) when torch.distributed is not initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_environment(device: Optional[str] = None) -> bool:
    """Initialise torch.distributed from torchrun's environment (``WORLD_SIZE`` > 1): the gloo
    backend on the CPU, NCCL on GPUs (each rank on ``cuda:LOCAL_RANK``). Returns whether it did."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    cuda = device is not None and str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def barrier() -> None:
    """torch.distributed.barrier() when initialised, else nothing."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def global_batches(loader, max_images: Optional[int] = None) -> List[List[int]]:
    """The index lists of every batch ``loader`` yields, in order, the last truncated at
    ``max_images`` images in all. Needs a map-style dataset and a (batch) sampler that yields the
    same indices on every process (e.g. ``shuffle=False``)."""
    from .errors import UserInputError

    sampler = getattr(loader, "batch_sampler", None)
    if sampler is None or getattr(loader, "dataset", None) is None:
        raise UserInputError("calibrate(distributed): the loader must be a DataLoader over a map-style "
                             "dataset with a batch size (its batches are split among the processes)")
    out, n = [], 0
    for idxs in sampler:
        idxs = list(idxs)
        if max_images is not None:
            idxs = idxs[: max(0, max_images - n)]
        if not idxs:
            break
        out.append(idxs)
        n += len(idxs)
    return out


def shard_loader(loader, batches: List[List[int]]):
    """A DataLoader over ``loader``'s dataset yielding exactly ``batches`` (index lists), with the
    loader's workers, collate function and pinning."""
    from torch.utils.data import DataLoader

    return DataLoader(loader.dataset, batch_sampler=batches, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory)


def all_reduce_calibration(cal) -> None:
    """Merge the partial calibrations of every process in place (exact merges, sums)."""
    import torch.distributed as dist

    for s in cal.stats.values():
        s.all_reduce()
    for p in list(cal.patches.values()) + list(cal.outputs.values()):
        p.all_reduce()
    for table in (cal.grads, cal.rank_sums, cal.chip_sums):
        for t in table.values():
            dist.all_reduce(t)
    counts = torch.tensor([cal.num_images, cal.num_batches] + [cal.rank_counts[l] for l in sorted(cal.rank_counts)],
                          dtype=torch.int64, device=_device(cal))
    dist.all_reduce(counts)
    cal.num_images, cal.num_batches = int(counts[0]), int(counts[1])
    for l, v in zip(sorted(cal.rank_counts), counts[2:].tolist()):
        cal.rank_counts[l] = int(v)


def _device(cal):
    s = next(iter(cal.stats.values()))
    return s.mean.device if s.mean is not None else torch.device("cpu")


def gather_points(points: list) -> list:
    """Every rank's list of (index, point) gathered on every rank, sorted by index."""
    import torch.distributed as dist

    _, world = rank_and_world()
    everything = [None] * world
    dist.all_gather_object(everything, points)
    return sorted((p for part in everything for p in part), key=lambda ip: ip[0])
