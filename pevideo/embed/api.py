"""The Python API of the embedding pipeline's in-memory half: :func:`embed_videos` and
:func:`classify_videos` (:func:`embed_to_file` is in :mod:`.tofile`; :func:`read_embeddings` in
:mod:`.reading`, :func:`merge_shards` in :mod:`.merging`)."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..processing import load_tokenizer
from .encode import ClipResult, PipelineStats, run_clips
from .inputs import expand_inputs
from .options import EmbedOptions
from .session import open_session

__all__ = ["embed_videos", "classify_videos", "ClassifyResult", "text_embeddings"]


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
    them (not L2-normalized, like upstream's), and ``pooled`` (H,) when asked for. On CPU each clip is
    encoded on its own: its result does not depend on the clips beside it in a batch (see
    :mod:`pevideo.embed.encode`).
    """
    # Not a generator itself: bad arguments and a missing checkpoint raise here, not at the first next().
    opts = EmbedOptions.of(processor=processor, num_frames=num_frames, fps=fps, batch_size=batch_size,
                           num_workers=num_workers, pooled=pooled, device=device, dtype=dtype, fast=fast,
                           progress=progress, apply_rotation=apply_rotation)
    paths, session = _start(videos, model, opts)
    return run_clips(paths, range(len(paths)), session, opts, stats if stats is not None else PipelineStats())


def _start(videos, model, opts: EmbedOptions):
    """The inputs expanded and the session opened, as every run starts."""
    paths = expand_inputs(videos)
    return paths, open_session(model, opts.processor, device=opts.device, dtype=opts.dtype, fast=opts.fast,
                               sampling=opts.sampling)


@dataclass
class ClassifyResult:
    """One video's label probabilities ``probs`` (L,) float32 (sigmoid of PE's video-text logits), or ``error``.

    ``truncated_suspect``: why the file may be cut short where nothing declares its length (see
    :attr:`pevideo.VideoMetadata.truncated_suspect`); not an error, the clip is scored."""

    index: int
    path: str
    probs: torch.Tensor | None = None
    error: str | None = None
    truncated_suspect: str | None = None

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
    opts = EmbedOptions.of(processor=processor, num_frames=num_frames, fps=fps, batch_size=batch_size,
                           num_workers=num_workers, device=device, dtype=dtype, fast=fast, progress=progress,
                           apply_rotation=apply_rotation)
    paths, session = _start(videos, model, opts)
    if tokenizer is None:
        if session.checkpoint is None:
            raise ValueError("classify_videos needs tokenizer= for a model that has no checkpoint folder")
        tokenizer = load_tokenizer(session.checkpoint)
    model = session.model()
    text = text_embeddings(model, tokenizer, labels)
    scale = float(model.text_video_logit_scale.float().item())
    bias = float(model.text_video_logit_bias.float().item())
    results = run_clips(paths, range(len(paths)), session, opts, stats if stats is not None else PipelineStats())
    return _scores(results, text, scale, bias)


def _scores(results: Iterator[ClipResult], text: torch.Tensor, scale: float, bias: float) -> Iterator[ClassifyResult]:
    try:
        for r in results:
            if not r.ok:
                yield ClassifyResult(r.index, r.path, error=r.error)
            else:
                yield ClassifyResult(r.index, r.path, probs=torch.sigmoid(text @ r.video_embeds * scale + bias),
                                     truncated_suspect=r.truncated_suspect)
    finally:
        results.close()
