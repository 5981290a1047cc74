"""torchrun: each rank's share of the shards, rank 0's one-time work, and the ranks' counters combined."""
from __future__ import annotations

import datetime
import os

import torch

from .encode import PipelineStats

__all__ = ["Dist", "combine_stats"]


def combine_stats(per_rank: list[PipelineStats]) -> PipelineStats:
    """All ranks' counters as one run: counts add up, time is the slowest rank's (ranks run side by side)."""
    if len(per_rank) == 1:
        return per_rank[0]
    out = PipelineStats()
    for st in per_rank:
        out.clips += st.clips
        out.failed += st.failed
        out.frames += st.frames
        out.batches += st.batches
    out.total_s = max(st.total_s for st in per_rank)
    busy = [st for st in per_rank if st.total_s > 0]
    # The mean fraction of time the ranks sat waiting, expressed against the slowest rank's time.
    out.wait_s = out.total_s * (sum(st.wait_fraction for st in busy) / len(busy) if busy else 0.0)
    return out


class Dist:
    """torchrun's rank and world size; sets up (and tears down) the process group when WORLD_SIZE > 1."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.created = False
        self.device = device
        if self.world <= 1:
            self.world, self.rank = 1, 0
            return
        import torch.distributed as dist

        if device.type == "cuda" and device.index is None:
            self.device = torch.device("cuda", self.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            # Ranks finish their shards at different times; the default timeout could fire at the barrier.
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(hours=24))
            self.created = True

    def on_rank0(self, fn, *args, **kwargs):
        """Run ``fn`` on rank 0 only; every rank returns its result or raises its error."""
        if self.world == 1:
            return fn(*args, **kwargs)
        import torch.distributed as dist

        box = [None]
        if self.rank == 0:
            try:
                box = [("ok", fn(*args, **kwargs))]
            except Exception as exc:
                box = [("error", exc)]
        dist.broadcast_object_list(box, src=0)
        if box[0][0] == "error":
            raise box[0][1]
        return box[0][1]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, on every rank (a barrier, too)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self):
        if self.created:
            import torch.distributed as dist

            dist.destroy_process_group()

