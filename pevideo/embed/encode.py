"""The encoding loop: batches from the decoder pool in, one :class:`ClipResult` per clip out, in order."""
from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..sampling import Sampling
from .workers import ClipDataset, collate, encoder_threads, plan_workers, worker_init

__all__ = ["ClipResult", "PipelineStats", "Encoder", "run_clips"]


@dataclass
class ClipResult:
    """One video's result. ``video_embeds`` (D,) and ``pooled`` (H,) are float32 CPU tensors (``pooled``
    only when asked for); ``frame_count`` is the source video's frame count, ``frame_indices`` the frames
    taken. A video that could not be read has ``error`` set (reason, naming the file) and no tensors.
    ``truncated_suspect``: why the file may be cut short where nothing declares its length (see
    :attr:`pevideo.VideoMetadata.truncated_suspect`); not an error, the clip is embedded."""

    index: int
    path: str
    video_embeds: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    frame_count: int = 0
    frame_indices: list[int] = field(default_factory=list)
    error: str | None = None
    truncated_suspect: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class PipelineStats:
    """Counters a run fills in as it goes. ``wait_s``: time the encoding loop sat blocked on the decoder
    pool (on a GPU, the device may still be busy with the previous batch meanwhile, so this bounds its
    idle time from above); ``wait_fraction`` = wait_s / total_s."""

    clips: int = 0
    failed: int = 0
    frames: int = 0
    batches: int = 0
    wait_s: float = 0.0
    total_s: float = 0.0

    @property
    def wait_fraction(self) -> float:
        return self.wait_s / self.total_s if self.total_s > 0 else 0.0

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.total_s if self.total_s > 0 else 0.0


class Encoder:
    """Launches a batch on the model's device without waiting for it; collects it one batch later, so
    the device works on batch i while the host fetches batch i+1. ``launch`` takes a batch as
    :func:`pevideo.embed.workers.collate` makes it; ``collect`` returns its :class:`ClipResult` list
    (``bench/bench_embed.py`` times the encoder alone with these two)."""

    def __init__(self, model, processor, pooled: bool):
        self.model, self.pooled = model, pooled
        self.normalization = processor.normalization
        self.cuda = model.device.type == "cuda"

    @torch.inference_mode()
    def launch(self, batch: dict):
        if batch["videos"] is None:
            return batch, None, None
        # Videos stay on the host (pinned): the model copies them over without blocking, and checks the
        # mask on the host, so nothing here waits for the device.
        out = self.model.get_video_features_uint8(batch["videos"], batch["mask"], self.normalization)
        tensors = [out.pooler_output]
        if self.pooled:
            tensors.append(out.encoder_pooler_output)
        host = [t.float().to("cpu", non_blocking=True) for t in tensors]
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        return batch, host, event

    @staticmethod
    def collect(pending) -> list[ClipResult]:
        batch, host, event = pending
        if event is not None:
            event.synchronize()
        results, row = [], 0
        for it in batch["items"]:
            r = ClipResult(index=it["index"], path=it["path"], frame_count=it["total"],
                           frame_indices=it["indices"], error=it["error"],
                           truncated_suspect=it.get("truncated_suspect"))
            if r.ok:
                r.video_embeds = host[0][row]
                if len(host) > 1:
                    r.pooled = host[1][row]
                row += 1
            results.append(r)
        return results


def run_clips(paths: Sequence[str], order: Sequence[int], model, processor, *, sampling: Sampling, batch_size,
         num_workers, pooled, stats: PipelineStats, progress, apply_rotation: bool = False) -> Iterator[ClipResult]:
    """Encode ``paths[i]`` for i in ``order``, frames taken by ``sampling``; yield results in that order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = list(order)
    num_workers = plan_workers(num_workers, len(order))
    if not order:
        return
    encoder = Encoder(model, processor, pooled)
    loader = torch.utils.data.DataLoader(
        ClipDataset(paths, processor, sampling, apply_rotation),
        batch_sampler=[order[i : i + batch_size] for i in range(0, len(order), batch_size)],
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=encoder.cuda,
        worker_init_fn=worker_init if num_workers else None,
        # Two batches ahead per worker: enough to hide decode jitter; more only fills shared memory.
        prefetch_factor=2 if num_workers else None,
    )
    bar = progress_bar(len(order), progress)
    # The encoder takes the cores the workers leave, never more threads than torch had (a user's
    # OMP_NUM_THREADS / set_num_threads stands); restored when the run ends or is closed.
    threads_before = torch.get_num_threads()
    torch.set_num_threads(min(threads_before, encoder_threads(num_workers)))
    start = time.perf_counter()
    it = iter(loader)
    pending = None
    try:
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            stats.wait_s += time.perf_counter() - t0
            launched = encoder.launch(batch) if batch is not None else None
            if pending is not None:
                results = encoder.collect(pending)
                for r in results:
                    stats.clips += r.ok
                    stats.failed += not r.ok
                    stats.frames += len(r.frame_indices)
                stats.batches += 1
                stats.total_s = time.perf_counter() - start
                if bar is not None:
                    bar.update(len(results))
                    if stats.failed:
                        bar.set_postfix(failed=stats.failed, refresh=False)
                yield from results
            if launched is None:
                break
            pending = launched
    finally:
        stats.total_s = time.perf_counter() - start
        if bar is not None:
            bar.close()
        del it  # shuts the worker processes down, also when the caller stops early
        torch.set_num_threads(threads_before)


def progress_bar(total: int, progress):
    """tqdm on stderr (clips/s, ETA); ``progress=None`` shows it only on a terminal."""
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="clip", file=sys.stderr, dynamic_ncols=True, smoothing=0.05)

