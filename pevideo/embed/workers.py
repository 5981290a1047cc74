"""Decoding in worker processes: each clip decoded with PyAV, resized to the model's frame size as uint8,
and batches padded together (``collate``) for the encoder."""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ..limits import Limits, VideoTooLargeError
from ..metadata import TruncatedVideoError, UnsupportedVideoError
from ..sampling import Sampling
from ..video import DecodePlan, read_video

__all__ = ["ClipDataset", "collate", "default_workers", "encoder_threads", "cpu_budget", "plan_workers",
           "WORKER_MEMORY"]

# What one decoding worker adds to a run: its own memory (USS, measured on CPU with PyAV decoding H.264:
# 20 MB at 360p, 45 MB at 1080p; tools that sum RSS count ~540 MB more, pages it shares with the main
# process), plus the batches it prepares, two ahead: 2 x batch x frames x h x w x 3 bytes.
WORKER_MEMORY = "20-50 MB of its own plus the 2 batches of frames it prepares"


class ClipDataset(torch.utils.data.Dataset):
    """Item i: the decoded clip of ``paths[i]``, sampled, resized and cropped as the processor would
    (uint8 (T, h, w, 3), each frame put through the processor's frame plan as it is decoded;
    normalizing is the model's job), or the reason it could not be read.

    The decode plan (sampling, frame plan, rotation, limits) is resolved once, here, and the same
    frozen record serves every clip of every worker."""

    def __init__(self, paths: Sequence[str], processor, sampling: Sampling, apply_rotation: bool = False,
                 limits: Limits | None = None):
        if not isinstance(sampling, Sampling):
            raise TypeError(f"sampling must be a pevideo.sampling.Sampling, got {type(sampling).__name__}")
        self.paths = paths
        self.plan = DecodePlan(sampling, processor.frame_plan, bool(apply_rotation),
                               limits if limits is not None else Limits.resolve())
        # PyAV, imported here in the parent: forked workers then start with it loaded instead of each
        # importing it (~0.1 s, more on a cold cache) before its first clip.
        import av  # noqa: F401

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        path = self.paths[i]
        stat = _stat(path)  # before decoding: a file changed meanwhile differs from it at the next run
        try:
            frames, meta = read_video(path, self.plan)
            return dict(index=i, path=path, frames=torch.from_numpy(frames), total=int(meta.total_num_frames),
                        indices=list(meta.frames_indices), error=None, truncated_suspect=meta.truncated_suspect,
                        **stat)
        except Exception as exc:  # one unreadable video is that video's problem, not the run's
            return dict(index=i, path=path, frames=None, total=0, indices=[], error=_reason(exc),
                        truncated_suspect=None, **stat)


def _stat(path: str) -> dict:
    """The input's size and modification time (what a rerun compares to notice a replaced file)."""
    try:
        st = os.stat(path)
        return dict(size=int(st.st_size), mtime_ns=int(st.st_mtime_ns))
    except OSError:
        return dict(size=-1, mtime_ns=-1)


def _reason(exc: Exception) -> str:
    # load_video's own errors already say what is wrong with which file; anything else gets its type.
    if type(exc) in (ValueError, FileNotFoundError, TruncatedVideoError, UnsupportedVideoError, VideoTooLargeError):
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


def plan_workers(requested: int | None, clips: int) -> int:
    """Decoding processes for a run of ``clips`` clips: ``requested`` (None: :func:`default_workers`),
    never more than there are clips, and at most the CPUs this process may use (:func:`cpu_budget`;
    more only add processes competing for the same cores, each with its own memory: see
    :data:`WORKER_MEMORY`), with a one-line warning when a request is cut down to that."""
    import warnings

    if requested is None:
        requested = default_workers()
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {requested!r}")
    cores = cpu_budget()
    n = min(requested, max(0, clips))
    if n > cores:
        warnings.warn(f"{requested} decoding workers asked for, but this process may use {cores} CPU(s): "
                      f"using {cores} (each worker takes {WORKER_MEMORY})", stacklevel=2)
        n = cores
    return n
