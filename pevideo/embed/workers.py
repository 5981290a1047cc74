"""Decoding in worker processes: each clip decoded with PyAV, resized to the model's frame size as uint8,
and batches padded together (``collate``) for the encoder."""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch

__all__ = ["ClipDataset", "collate", "default_workers", "encoder_threads", "cpu_budget"]


class ClipDataset(torch.utils.data.Dataset):
    """Item i: the decoded clip of ``paths[i]`` resized by ``processor.resize_frames`` (uint8 (T, S, S, 3),
    a channels-last view; normalizing is the model's job), or the reason it could not be read."""

    def __init__(self, paths: Sequence[str], processor, num_frames: int | None, fps: float | None,
                 apply_rotation: bool = False):
        self.paths, self.processor, self.num_frames, self.fps = paths, processor, num_frames, fps
        # Each frame is resized as it is decoded (4K frames are never all held), exactly as the processor
        # would resize it; resize_frames then finds the size already right and only crops / views.
        size, mode = processor.resize_settings
        # PyAV and the decoder, imported here in the parent: forked workers then start with them loaded
        # instead of each importing them (~0.1 s, more on a cold cache) before its first clip.
        import av  # noqa: F401

        from .. import _decode, video  # noqa: F401
        self.decode = dict(size=size, resample=mode, apply_rotation=apply_rotation)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        from ..video import load_video

        path = self.paths[i]
        try:
            frames, meta = load_video(path, num_frames=self.num_frames, fps=self.fps, **self.decode)
            clip = self.processor.resize_frames(frames)
            return dict(index=i, path=path, frames=clip, total=int(meta.total_num_frames),
                        indices=list(meta.frames_indices), error=None)
        except Exception as exc:  # one unreadable video is that video's problem, not the run's
            return dict(index=i, path=path, frames=None, total=0, indices=[], error=_reason(exc))


def _reason(exc: Exception) -> str:
    # load_video's own errors already say what is wrong with which file; anything else gets its type.
    if type(exc) in (ValueError, FileNotFoundError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def collate(items: list[dict]) -> dict:
    """Real clips padded into one uint8 batch (B, T_max, S, S, 3) + mask (B, T_max) bool, or None when all
    clips have T_max frames; the failures ride along (metadata only)."""
    ok = [it for it in items if it["error"] is None]
    videos = mask = None
    if ok:
        lengths = [it["frames"].shape[0] for it in ok]
        t_max = max(lengths)
        if min(lengths) == t_max:
            # No padding, no mask: the model then has no mask to copy over, which would wait for the device.
            videos = torch.stack([it["frames"] for it in ok])
        else:
            videos = torch.zeros((len(ok), t_max, *ok[0]["frames"].shape[1:]), dtype=torch.uint8)
            for b, it in enumerate(ok):
                videos[b, : lengths[b]] = it["frames"]
            mask = torch.arange(t_max)[None, :] < torch.tensor(lengths)[:, None]
    meta = [{k: v for k, v in it.items() if k != "frames"} for it in items]
    return dict(items=meta, videos=videos, mask=mask)


def worker_init(_worker_id: int) -> None:
    # One thread per worker: each worker decodes and resizes one clip at a time, the workers together
    # take their share of the cores and the encoder the rest (see encoder_threads); intra-op threads
    # here would only fight the encoder for the same cores. The environment variables reach libraries
    # that start their thread pools later in this process (and anything it runs).
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    torch.set_num_threads(1)


def cpu_budget() -> int:
    """The CPUs this process may use (its affinity: container / taskset limits count, unlike cpu_count),
    shared evenly with the other torchrun ranks on this machine."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 2
    return max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def default_workers() -> int:
    """Decoding processes by default: the CPU budget less one for the encoding loop; at least 1, at most 16."""
    return max(1, min(16, cpu_budget() - 1))


def encoder_threads(num_workers: int) -> int:
    """Torch threads for the encoding loop: the cores the (single-threaded) decoding workers leave, at
    least one. Without this the encoder's OpenMP threads and the workers oversubscribe the cores, and
    throughput swings 4x from run to run on a small machine."""
    return max(1, cpu_budget() - max(0, int(num_workers)))
