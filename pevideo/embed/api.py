"""The Python API of the embedding pipeline: :func:`embed_videos`, :func:`embed_to_file`,
:func:`classify_videos` (and :func:`read_embeddings` / :func:`merge_shards` from :mod:`.store`)."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .distributed import Dist, combine_stats
from .encode import ClipResult, PipelineStats, run_clips
from .inputs import expand_inputs
from ..processing import load_tokenizer
from .session import check_sampling, open_session
from .store import (
    DEFAULT_SHARD_SIZE,
    MAX_HEADER_JSON,
    EmbedSummary,
    Layout,
    fingerprint,
    merge_shards,
    model_id,
    output_lock,
    prepare,
    sha256,
    shard_ok,
    summary_of_final,
    write_shard,
)

__all__ = ["embed_videos", "embed_to_file", "classify_videos", "ClassifyResult", "text_embeddings", "check_out"]


def embed_videos(
    videos,
    model,
    *,
    processor=None,
    num_frames: int | None = None,
    fps: float | None = None,
    batch_size: int = 8,
    num_workers: int | None = None,
    pooled: bool = False,
    device=None,
    dtype=None,
    fast: bool | None = None,
    progress: bool | None = False,
    stats: PipelineStats | None = None,
    apply_rotation: bool = False,
) -> Iterator[ClipResult]:
    """Embed videos; yields one :class:`ClipResult` per video, in input order.

    Args:
        videos: video paths, folders or list files (expanded by :func:`expand_inputs`).
        model: a :class:`pevideo.PeVideoModel`, or a checkpoint folder / Hub id, loaded on ``device``
            in ``dtype`` with ``fast`` (these apply only then; see :func:`pevideo.embed.session.open_session`).
        processor: a :class:`pevideo.PeVideoVideoProcessor` or a folder to load one from; default: the
            checkpoint's (also for a model object loaded with ``from_pretrained``), else PE Video's
            preprocessing at the model's frame size, with one warning.
        num_frames: frames sampled per clip, spread over the video as upstream samples (default 16,
            unless ``fps`` is given); ``fps``: sample at this rate instead (clips then differ in length).
        batch_size: clips per encoder call. num_workers: decoding processes (0: decode in this process;
            default: one per CPU (shared among torchrun ranks) but one, at most 16).
        pooled: also return the video encoder's pooled output (before the contrastive head).
        progress: a progress bar on stderr (None: only on a terminal). stats: a
            :class:`PipelineStats` to fill in (throughput, time blocked on decoding).
        apply_rotation: rotate frames upright by their display matrix (off, as upstream; see
            :func:`pevideo.load_video`).

    Results carry float32 CPU tensors: ``video_embeds`` (D,) as ``model.get_video_features`` returns
    them (not L2-normalized, like upstream's), and ``pooled`` (H,) when asked for.
    """
    # Not a generator itself: bad arguments and a missing checkpoint raise here, not at the first next().
    sampling = check_sampling(num_frames, fps)
    paths = expand_inputs(videos)
    session = open_session(model, processor, device=device, dtype=dtype, fast=fast, sampling=sampling)
    return run_clips(paths, range(len(paths)), session.model(), session.processor, sampling=sampling,
                     batch_size=batch_size, num_workers=num_workers, pooled=pooled,
                     stats=stats if stats is not None else PipelineStats(), progress=progress,
                     apply_rotation=apply_rotation)


@dataclass
class ClassifyResult:
    """One video's label probabilities ``probs`` (L,) float32 (sigmoid of PE's video-text logits), or ``error``."""

    index: int
    path: str
    probs: torch.Tensor | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@torch.inference_mode()
def text_embeddings(model, tokenizer, labels: Sequence[str]) -> torch.Tensor:
    """Text embeddings (L, D) float32 of ``labels``, as ``model(...)`` computes ``text_video_embeds``."""
    if not labels:
        raise ValueError("no labels given")
    enc = tokenizer(list(labels), padding=True, return_tensors="pt")
    out = model.get_text_features(enc["input_ids"], enc.get("attention_mask"))
    return out.pooler_output.float().cpu()


def classify_videos(
    videos,
    model,
    labels: Sequence[str],
    *,
    tokenizer=None,
    processor=None,
    num_frames: int | None = None,
    fps: float | None = None,
    batch_size: int = 8,
    num_workers: int | None = None,
    device=None,
    dtype=None,
    fast: bool | None = None,
    progress: bool | None = False,
    stats: PipelineStats | None = None,
    apply_rotation: bool = False,
) -> Iterator[ClassifyResult]:
    """Zero-shot classification: yields per video (in input order) the sigmoid probability of each label.

    ``probs[j] = sigmoid(video_embeds · text_embeds[j] · logit_scale + logit_bias)``, computed in float32,
    i.e. ``model(...).logits_video_text.sigmoid()`` as in upstream's quickstart; each label is scored
    on its own (they need not sum to 1). ``tokenizer``: default, the checkpoint's (``AutoTokenizer``;
    needed for a model built in memory). ``model.save_pretrained`` writes no tokenizer: see
    :func:`pevideo.processing.load_tokenizer` for where one comes from. Other arguments as
    :func:`embed_videos`.
    """
    sampling = check_sampling(num_frames, fps)
    paths = expand_inputs(videos)
    session = open_session(model, processor, device=device, dtype=dtype, fast=fast, sampling=sampling)
    if tokenizer is None:
        if session.checkpoint is None:
            raise ValueError("classify_videos needs tokenizer= for a model that has no checkpoint folder")
        tokenizer = load_tokenizer(session.checkpoint)
    model, processor = session.model(), session.processor
    text = text_embeddings(model, tokenizer, labels)
    scale = float(model.text_video_logit_scale.float().item())
    bias = float(model.text_video_logit_bias.float().item())
    results = run_clips(paths, range(len(paths)), model, processor, sampling=sampling,
                        batch_size=batch_size, num_workers=num_workers, pooled=False,
                        stats=stats if stats is not None else PipelineStats(), progress=progress,
                        apply_rotation=apply_rotation)
    return _scores(results, text, scale, bias)


def _scores(results: Iterator[ClipResult], text: torch.Tensor, scale: float, bias: float) -> Iterator[ClassifyResult]:
    try:
        for r in results:
            if not r.ok:
                yield ClassifyResult(r.index, r.path, error=r.error)
            else:
                yield ClassifyResult(r.index, r.path, probs=torch.sigmoid(text @ r.video_embeds * scale + bias))
    finally:
        results.close()


def check_out(out) -> None:
    """Refuse an ``out`` that would not be what its name says (:class:`pevideo.errors.UsageError`):
    ``X.safetensors`` is one file, any other name a folder of shards; a name with another extension
    (``w14.txt``, ``emb.npy``) looks like a file and is refused unless it is an existing folder or ends
    with a path separator; an existing file that is not a ``.safetensors`` output, or a folder named
    ``X.safetensors``, is refused too."""
    from ..errors import UsageError

    p = os.fspath(out)
    if not p:
        raise UsageError("the output path is empty")
    if p.endswith(".safetensors"):
        if os.path.isdir(p):
            raise UsageError(f"{p} is a folder; a .safetensors output is one file (drop the suffix for a folder of shards)")
        return
    if p.endswith(("/", os.sep)) or os.path.isdir(p):
        return  # a folder, said so
    if os.path.exists(p):
        raise UsageError(f"{p} exists and is not a folder; the output is X.safetensors (one file) or a folder")
    ext = os.path.splitext(os.path.basename(p))[1]
    if ext:
        raise UsageError(f"{p}: a {ext} name would become a folder of shards; the output is X.safetensors (one "
                         f"file) or a folder (a name without an extension, or ending with / as in {p}/)")


def embed_to_file(
    inputs,
    model,
    out,
    *,
    processor=None,
    num_frames: int | None = None,
    fps: float | None = None,
    batch_size: int = 8,
    shard_size: int = DEFAULT_SHARD_SIZE,
    num_workers: int | None = None,
    pooled: bool = False,
    device=None,
    dtype=None,
    fast: bool | None = None,
    errors=None,
    overwrite: bool = False,
    keep_shards: bool = False,
    progress: bool | None = None,
    on_error: Callable[[ClipResult], None] | None = None,
    on_shard: Callable[[int], None] | None = None,
    apply_rotation: bool = False,
) -> EmbedSummary:
    """Embed every video of ``inputs`` into ``out``, resumably; what ``pevideo embed`` runs.

    Args:
        inputs: video files, folders and list files (see :func:`expand_inputs`).
        model: a checkpoint folder / Hub id (loaded on ``device`` in ``dtype`` with ``fast`` only when
            some shard is left to do) or a :class:`pevideo.PeVideoModel`.
        out: ``X.safetensors`` (one file; shards are worked on in ``X.safetensors.shards/``) or a folder
            (the shards are the output); other names are refused as :func:`check_out` says. See the
            module docstring for the contents.
        shard_size: clips per shard, the unit of resumption (and of work split across ranks).
        errors: the errors file (JSONL ``{"index", "path", "error"}``); default ``X.errors.jsonl`` or
            ``folder/errors.jsonl``. It is always written, empty when nothing failed.
        overwrite: remove a previous run's outputs first (else a run with different arguments is
            refused with :class:`ManifestMismatchError`, and one with the same arguments resumes).
        keep_shards: keep the shard folder after joining a ``.safetensors`` output (recorded in the
            manifest: a later :func:`merge_shards` keeps them too).
        on_error: called with each failed :class:`ClipResult` as it happens (the CLI prints them).
        on_shard: called with each shard number once that shard is on disk.
        Other arguments as :func:`embed_videos`.

    Under torchrun (WORLD_SIZE > 1) rank r takes shards s with s % WORLD_SIZE == r on cuda:LOCAL_RANK
    (or CPU, with gloo), and rank 0 joins them after all ranks are done. Returns an
    :class:`EmbedSummary`; ``summary.exit_status`` is 1 when any video failed.
    """
    check_out(out)
    sampling = check_sampling(num_frames, fps)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    paths = expand_inputs(inputs)
    layout = Layout.of(out, errors)
    if layout.final is not None:
        size = sum(len(p.encode("utf-8", "surrogateescape")) + 4 for p in paths)
        if size > MAX_HEADER_JSON:
            raise ValueError(f"{len(paths)} paths are too many for one safetensors file's header; give a folder as "
                             "the output (no .safetensors suffix) to keep the shards")
    session = open_session(model, processor, device=device, dtype=dtype, fast=fast, sampling=sampling)
    dist = Dist(session.device)
    lock = output_lock(layout)
    try:
        dist.on_rank0(lock.acquire)  # one run at a time per output; rank 0 holds it for all ranks
        if not session.loaded:
            session.device = dist.device  # under torchrun: this rank's GPU
        # apply_rotation recorded only when on, so that earlier runs' outputs keep their fingerprint
        fp = fingerprint(paths, model_id(session.source), session.processor, sampling.num_frames, sampling.fps,
                         session.dtype, pooled,
                         shard_size, fast=session.fast, **({"apply_rotation": True} if apply_rotation else {}))
        fp_sha = sha256(json.dumps(fp, sort_keys=True).encode())
        num_shards = math.ceil(len(paths) / shard_size)
        if dist.on_rank0(prepare, layout, fp, fp_sha, num_shards, overwrite, keep_shards) == "complete":
            # Same arguments, already joined: nothing to do but restore the errors file if it was lost.
            summary = dist.on_rank0(summary_of_final, layout)
            summary.shards_skipped = num_shards
            return summary

        mine = [s for s in range(num_shards) if s % dist.world == dist.rank]
        todo = [s for s in mine if not shard_ok(layout.shard(s), fp_sha)]
        stats = PipelineStats()
        if todo:
            _encode_shards(paths, todo, layout, session.model(), session.processor, fp_sha, shard_size=shard_size,
                           sampling=sampling, batch_size=batch_size, num_workers=num_workers,
                           pooled=pooled, stats=stats, progress=progress if dist.rank == 0 else False,
                           on_error=on_error, on_shard=on_shard, apply_rotation=apply_rotation)
        # Also the barrier: after it, every rank's shards are on disk.
        ranks = dist.gather((len(todo), len(mine) - len(todo), stats))
        summary = dist.on_rank0(merge_shards, out, keep_shards=keep_shards, errors=errors)
        summary.shards_written = sum(r[0] for r in ranks)
        summary.shards_skipped = sum(r[1] for r in ranks)
        summary.stats = combine_stats([r[2] for r in ranks])
        return summary
    finally:
        lock.release()  # a no-op on ranks other than 0
        dist.close()


def _encode_shards(paths, todo, layout, model, processor, fp_sha, *, shard_size, sampling, batch_size,
                   num_workers, pooled, stats, progress, on_error, on_shard, apply_rotation=False) -> None:
    """Encode the clips of shards ``todo``; write each shard as soon as its last clip is in."""
    dims = (model.config.text_config.hidden_size, model.config.video_config.hidden_size)
    order = [i for s in todo for i in range(s * shard_size, min((s + 1) * shard_size, len(paths)))]
    results = run_clips(paths, order, model, processor, sampling=sampling, batch_size=batch_size,
                        num_workers=num_workers, pooled=pooled, stats=stats, progress=progress,
                        apply_rotation=apply_rotation)
    buf: list[ClipResult] = []
    try:
        for r in results:
            if not r.ok and on_error is not None:
                on_error(r)
            buf.append(r)
            s = r.index // shard_size
            if r.index == min((s + 1) * shard_size, len(paths)) - 1:  # the shard's last clip
                write_shard(layout, s, buf, fp_sha, dims, pooled, sampling.num_frames or 0)
                buf = []
                if on_shard is not None:
                    on_shard(s)
    finally:
        results.close()  # stop the decoder pool now, also when interrupted
