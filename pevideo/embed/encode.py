"""The encoding loop: batches from the decoder pool in, one :class:`ClipResult` per clip out, in order.

A decoding worker killed by the OS (the out-of-memory killer, ``kill -9``) does not end the run: the
workers are restarted and the clips that were in flight decoded again, once; if a worker dies again
over them, they are decoded one at a time, and the clip that kills its worker is that clip's error
("decoding worker killed by signal SIGKILL (likely out of memory)"), the run going on.

On CPU each clip is encoded on its own, so its embedding does not depend on which clips share its
batch (the matrix products' blocking, and so their rounding, depends on the number of rows); on a GPU
clips share the batch's products (see README: Embedding and classifying many videos).
"""
from __future__ import annotations

import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .workers import ClipDataset, collate, encoder_threads, plan_workers, worker_init

__all__ = ["ClipResult", "PipelineStats", "Encoder", "run_clips", "worker_death"]


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
    source_size: int = -1  # the input's size and modification time when it was decoded (-1: unknown)
    source_mtime_ns: int = -1

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
        if self.cuda:
            # Videos stay on the host (pinned): the model copies them over without blocking, and checks
            # the mask on the host, so nothing here waits for the device.
            outs = [self._encode(batch["videos"], batch["mask"])]
        else:
            # One clip at a time, without its padding: the same clip gives the same bits in any batch.
            videos, mask = batch["videos"], batch["mask"]
            lengths = mask.sum(1).tolist() if mask is not None else [videos.shape[1]] * videos.shape[0]
            outs = [self._encode(videos[b : b + 1, :n].contiguous(), None) for b, n in enumerate(lengths)]
        host = [torch.cat([o[k] for o in outs]).float().to("cpu", non_blocking=True) for k in range(len(outs[0]))]
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        return batch, host, event

    def _encode(self, videos, mask) -> list[torch.Tensor]:
        out = self.model.get_video_features_uint8(videos, mask, self.normalization)
        return [out.pooler_output, out.encoder_pooler_output] if self.pooled else [out.pooler_output]

    @staticmethod
    def collect(pending) -> list[ClipResult]:
        batch, host, event = pending
        if event is not None:
            event.synchronize()
        results, row = [], 0
        for it in batch["items"]:
            r = ClipResult(index=it["index"], path=it["path"], frame_count=it["total"],
                           frame_indices=it["indices"], error=it["error"],
                           truncated_suspect=it.get("truncated_suspect"), source_size=it.get("size", -1),
                           source_mtime_ns=it.get("mtime_ns", -1))
            if r.ok:
                r.video_embeds = host[0][row]
                if len(host) > 1:
                    r.pooled = host[1][row]
                row += 1
            results.append(r)
        return results


def run_clips(paths: Sequence[str], order: Sequence[int], session, opts, stats: PipelineStats,
              progress=None) -> Iterator[ClipResult]:
    """Encode ``paths[i]`` for i in ``order`` with ``session``'s model and processor as ``opts``
    (:class:`~pevideo.embed.options.EmbedOptions`) say; yield results in that order. ``progress``
    overrides ``opts.progress``."""
    order = list(order)
    num_workers = plan_workers(opts.num_workers, len(order))
    if not order:
        return
    encoder = Encoder(session.model(), session.processor, opts.pooled)
    dataset = ClipDataset(paths, session.processor, opts.sampling, opts.apply_rotation)
    bar = progress_bar(len(order), opts.progress if progress is None else progress)
    # The encoder takes the cores the workers leave, never more threads than torch had (a user's
    # OMP_NUM_THREADS / set_num_threads stands); restored when the run ends or is closed. Fixed for the
    # whole run (also while workers are restarted): the thread count changes a product's rounding.
    threads_before = torch.get_num_threads()
    torch.set_num_threads(min(threads_before, encoder_threads(num_workers)))
    start = time.perf_counter()
    try:
        for results in _surviving(dataset, order, opts.batch_size, num_workers, encoder, stats):
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
    finally:
        stats.total_s = time.perf_counter() - start
        if bar is not None:
            bar.close()
        torch.set_num_threads(threads_before)


class WorkerDied(Exception):
    """A decoding worker process was killed (``reason`` says by what)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


_DEATH = re.compile(r"DataLoader worker \(pid\(?s?\)? ([0-9, ]+)\) (?:is killed by signal: ([^.]*)|exited unexpectedly"
                    r"(?: with exit code (-?[0-9]+))?)")


def worker_death(exc: BaseException) -> str | None:
    """What killed a DataLoader worker, in words, when ``exc`` is the DataLoader saying one died; else None."""
    m = _DEATH.search(str(exc)) if isinstance(exc, RuntimeError) else None
    if m is None:
        return None
    pid, desc, code = m.group(1).strip(), m.group(2), m.group(3)
    if desc is None and code is not None and int(code) < 0:
        desc = signal.strsignal(-int(code)) or ""
    if desc is None:
        return f"the decoding worker (pid {pid}) exited unexpectedly" + (f" (exit code {code})" if code else "")
    name = next((s.name for s in signal.Signals if signal.strsignal(s) == desc), desc)
    likely = ", likely out of memory (the kernel's OOM killer; see dmesg)" if name == "SIGKILL" else ""
    return f"the decoding worker (pid {pid}) was killed by signal {name}{likely}"


def _loader(dataset, clips: list[int], batch_size: int, num_workers: int, pin: bool, prefetch: int = 2):
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=[clips[i : i + batch_size] for i in range(0, len(clips), batch_size)],
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin,
        worker_init_fn=worker_init if num_workers else None,
        # Two batches ahead per worker: enough to hide decode jitter; more only fills shared memory.
        prefetch_factor=prefetch if num_workers else None,
    )


def _pipelined(loader, encoder: Encoder, stats: PipelineStats) -> Iterator[list[ClipResult]]:
    """Each batch's results, the device encoding batch i while the host fetches batch i+1; WorkerDied
    (after the batch already launched is collected) when a decoding worker is killed."""
    it = None
    pending = None
    died = None
    deaths: list[str] = []
    restore = None
    try:
        it = iter(loader)
        restore = _deferring_worker_deaths(deaths)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it, None)
            except RuntimeError as exc:
                died = worker_death(exc)
                if died is None:
                    raise
                # What the death signal said (which signal) says more than the loader's "exited unexpectedly".
                died = deaths[-1] if deaths else died
                batch = None
            stats.wait_s += time.perf_counter() - t0
            launched = encoder.launch(batch) if batch is not None else None
            if pending is not None:
                yield encoder.collect(pending)
            if died is not None:
                raise WorkerDied(died)
            if launched is None:
                return
            pending = launched
    finally:
        del it  # shuts the worker processes down, also when the caller stops early
        if restore is not None:
            restore()


def _deferring_worker_deaths(deaths: list[str]):
    """torch's SIGCHLD handler raises "DataLoader worker ... is killed by signal" wherever the main thread
    happens to be (inside the model, writing a shard): wrap it so that a worker's death is noted in
    ``deaths`` instead, and surfaces where the run can handle it, at the next batch (the loader notices
    the dead worker there). Returns what restores the previous handler."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGCHLD"):
        return None
    previous = signal.getsignal(signal.SIGCHLD)
    if not callable(previous):
        return None  # no torch handler (no worker processes): nothing raises

    def handler(signum, frame):
        try:
            previous(signum, frame)
        except RuntimeError as exc:
            reason = worker_death(exc)
            if reason is None:
                raise
            deaths.append(reason)

    signal.signal(signal.SIGCHLD, handler)
    return lambda: signal.signal(signal.SIGCHLD, previous)


def _surviving(dataset, order: list[int], batch_size: int, num_workers: int, encoder, stats):
    """Batches of results for ``order``, in order, surviving decoding workers killed by the OS: the
    first death restarts the workers and decodes the clips in flight again; a death among those same
    clips decodes them one at a time (one worker, one clip a batch), and a clip that still kills its
    worker gets that as its error. Without worker processes there is nothing to survive."""
    # (clips, batch size, workers, prefetch, suspects, isolating): the first `suspects` clips were in
    # flight at a death; `isolating`: one clip at a time, so that a death names its clip.
    plan = [(order, batch_size, num_workers, 2, 0, False)]
    while plan:
        clips, bs, nw, prefetch, suspects, isolating = plan.pop(0)
        done = 0
        try:
            for results in _pipelined(_loader(dataset, clips, bs, nw, encoder.cuda, prefetch), encoder, stats):
                done += len(results)
                yield results
            continue
        except WorkerDied as exc:
            died = exc.reason
        rest = clips[done:]
        if not rest:
            continue
        if isolating:  # the clip at the front killed its worker (it was the only one in flight)
            i = rest[0]
            yield [ClipResult(index=i, path=dataset.paths[i],
                              error=f"{dataset.paths[i]}: decoding it kills the worker process ({died}); skipped")]
            if len(rest) > 1:
                plan.insert(0, (rest[1:], 1, 1, 1, len(rest) - 1, True))
            continue
        in_flight = min(len(rest), bs * max(nw, 1) * prefetch)
        if suspects > done:  # died again while clips of the last death were still in flight
            isolate = clips[done:suspects]
            warnings.warn(f"{died} again; decoding the {len(isolate)} clip(s) it was working on one at a time",
                          stacklevel=2)
            plan[0:0] = [(isolate, 1, 1, 1, len(isolate), True), (clips[suspects:], bs, nw, prefetch, 0, False)]
        else:
            warnings.warn(f"{died}; restarting the decoding workers and decoding its {in_flight} clip(s) in "
                          "flight again", stacklevel=2)
            plan.insert(0, (rest, bs, nw, prefetch, in_flight, False))


def progress_bar(total: int, progress):
    """tqdm on stderr (clips/s, ETA); ``progress=None`` shows it only on a terminal."""
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="clip", file=sys.stderr, dynamic_ncols=True, smoothing=0.05)

