"""Which process scores what: torch.distributed ranks, chunk assignment and the few collectives.

Chunk c (positions [c * chunk_size, (c + 1) * chunk_size), whole batches) belongs to rank c % world.
Every batch therefore holds the same positions whatever the number of processes, which is what makes
a 2-process run give bitwise the scores of a 1-process run (at the same thread count per process).
Launch with ``torchrun --nproc_per_node N -m iwd_fast score ...``; ``init_from_env`` starts the
process group (gloo for CPU tensors, nccl for CUDA) from torchrun's environment variables.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Dict, List

import torch
import torch.distributed as dist

__all__ = ["Shard", "init_from_env"]

# Rank 0 may train a network or compute a validation direction while the others wait at a collective.
_TIMEOUT = datetime.timedelta(hours=12)


@dataclass(frozen=True)
class Shard:
    """This process's place in the run: ``rank`` of ``world`` (1 without torch.distributed)."""

    rank: int = 0
    world: int = 1

    @staticmethod
    def current() -> "Shard":
        if dist.is_available() and dist.is_initialized():
            return Shard(dist.get_rank(), dist.get_world_size())
        return Shard()

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def chunks(self, n_chunks: int) -> List[int]:
        return list(range(self.rank, n_chunks, self.world))

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def gather(self, obj: Any) -> List[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: List[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def share(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj if self.leader else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast(self, tensors: Dict[str, torch.Tensor], like: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Rank 0's ``tensors`` on every rank (others pass shapes and dtypes in ``like``), bit for bit."""
        if not self.active:
            return tensors
        out = {}
        for name in sorted(like):
            t = (tensors[name] if self.leader else torch.empty_like(like[name])).contiguous()
            dist.broadcast(t, src=0)
            out[name] = t
        return out

    def agree(self, value: Any, what: str) -> None:
        """Refuse to go on when the ranks disagree on ``value`` (their data, model or settings differ)."""
        values = self.gather(value)
        odd = [r for r, v in enumerate(values) if v != values[0]]
        if odd:
            raise ValueError(f"score_dataset: ranks {odd} disagree with rank 0 on the {what}: every process must "
                             "load the same data, model and settings")


def init_from_env(device: torch.device) -> Shard:
    """Join the process group described by torchrun's environment (WORLD_SIZE > 1), if not done yet.

    CUDA: nccl, each process on cuda:LOCAL_RANK. CPU: gloo. Returns the resulting :class:`Shard`.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available() or dist.is_initialized():
        return Shard.current()
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", timeout=_TIMEOUT)
    else:
        dist.init_process_group("gloo", timeout=_TIMEOUT)
    return Shard.current()
