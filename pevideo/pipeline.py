"""Many videos to embeddings (and zero-shot label probabilities), as fast as the encoder allows.

The pipeline behind ``pevideo embed`` / ``pevideo classify``, usable from Python:

* :func:`embed_videos` yields one :class:`ClipResult` per video, in input order. Background worker
  processes (a ``torch.utils.data.DataLoader``) decode with PyAV and resize to the model's frame size,
  shipping uint8 frames (4× less than float32) in pinned memory, while the main process encodes the
  previous batch; normalization happens inside the model (``forward_uint8``). Clips of unequal length
  share a batch at no extra compute: the model never encodes padded frames.
* :func:`embed_to_file` runs that over a list of inputs and writes safetensors shards, each first under
  a temporary name and renamed when complete, next to a manifest recording what produced them. A rerun
  with the same arguments skips finished shards; one with different arguments is refused
  (:class:`ManifestMismatchError`). Videos that can't be read are recorded (path, reason) and skipped.
  Under ``torchrun`` each rank takes every WORLD_SIZE-th shard and rank 0 joins them at the end.
* :func:`read_embeddings` reads the result (one file or a folder of shards) back in input order;
  :func:`merge_shards` joins finished shards offline; :func:`classify_videos` scores clips against
  text labels (sigmoid probabilities, as PE's contrastive head is trained).

Output layout, for ``out="emb.safetensors"``: the file itself (shards are worked on in
``emb.safetensors.shards/`` and removed once joined) and ``emb.errors.jsonl``. For ``out="emb"`` (no
``.safetensors`` suffix): a folder ``emb/`` holding ``manifest.json``, ``shard-00000.safetensors``, ...
and ``errors.jsonl``. Every file holds ``video_embeds`` (N, D) float32, ``frame_counts`` (N,) int64
(frames in the source video), ``sampled_indices`` (N, T) int32 (−1 pads clips with fewer frames),
``input_index`` (N,) int64 (position in the input list), optionally ``pooled`` (N, H) float32 (the
video encoder's pooled output, before the contrastive head), and in its metadata the ``paths`` of those
N clips and the ``errors`` as JSON. Failed videos have no row.
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .loading import parse_dtype

__all__ = [
    "embed_videos",
    "embed_to_file",
    "classify_videos",
    "read_embeddings",
    "merge_shards",
    "expand_inputs",
    "load_model",
    "load_processor",
    "ClipResult",
    "ClassifyResult",
    "Embeddings",
    "EmbedSummary",
    "PipelineStats",
    "ManifestMismatchError",
]

FORMAT = "pevideo.embeddings"
FORMAT_VERSION = 1
DEFAULT_NUM_FRAMES = 16
DEFAULT_SHARD_SIZE = 1024

VIDEO_EXTENSIONS = frozenset(
    ".mp4 .m4v .mov .mkv .webm .avi .mpg .mpeg .ts .mts .m2ts .flv .wmv .3gp .3g2 .ogv .gif .mxf".split()
)
LIST_EXTENSIONS = (".txt", ".lst", ".list")

# The safetensors header (where paths and errors go) is limited to 100 MB by its readers; stay well below.
_MAX_HEADER_JSON = 40_000_000


class ManifestMismatchError(ValueError):
    """An output folder or file holds results made with different arguments (model, frames, inputs, ...)."""


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------
def expand_inputs(inputs: str | os.PathLike | Iterable[str | os.PathLike], *, must_exist: bool = False) -> list[str]:
    """Video paths from files, folders and list files, in order.

    * a folder: the video files under it (by extension, see ``VIDEO_EXTENSIONS``), recursively, sorted
      by path; hidden files and folders are skipped;
    * a ``.txt`` / ``.lst`` / ``.list`` file: one path per line (blank lines and lines starting with
      ``#`` skipped); relative paths are relative to the list file's folder; folders listed expand;
    * anything else: a video file, taken as is.

    A missing video is that video's error when it is decoded; with ``must_exist`` (the CLI's choice:
    a typo on the command line should not start a long run) a missing input named directly raises
    FileNotFoundError. Raises ValueError when nothing is found.
    """
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    out: list[str] = []
    for item in inputs:
        p = os.fspath(item)
        if must_exist and not os.path.exists(p):
            raise FileNotFoundError(f"input not found: {p}")
        if os.path.isdir(p):
            out.extend(_walk(p))
        elif p.lower().endswith(LIST_EXTENSIONS) and os.path.isfile(p):
            out.extend(_read_list(p))
        else:
            out.append(p)
    if not out:
        raise ValueError(f"no videos found in {[os.fspath(i) for i in inputs]}")
    return out


def _walk(folder: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in VIDEO_EXTENSIONS:
                found.append(os.path.join(root, f))
    # Sort by path components so that "a/b.mp4" < "a-c.mp4" regardless of the separator's code point.
    return sorted(found, key=lambda p: os.path.relpath(p, folder).split(os.sep))


def _read_list(list_file: str) -> list[str]:
    base = os.path.dirname(os.path.abspath(list_file))
    out = []
    with open(list_file, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = line if os.path.isabs(line) else os.path.join(base, line)
            out.extend(_walk(p) if os.path.isdir(p) else [p])
    return out


# --------------------------------------------------------------------------------------------------
# Model, processor, device
# --------------------------------------------------------------------------------------------------


def _resolve_device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but CUDA is not available here")
    return device


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """None/"auto": bfloat16 on a GPU, float32 on CPU."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return parse_dtype(dtype)


def load_model(path, *, device=None, dtype=None, fast: bool | None = None):
    """``PeVideoModel.from_pretrained`` with the pipeline's defaults: CUDA when available, bfloat16 on a
    GPU and float32 on CPU, fused kernels on a GPU (on CPU they would run in Triton's slow interpreter)."""
    from .modeling import PeVideoModel

    device = _resolve_device(device)
    fast = (device.type == "cuda") if fast is None else bool(fast)
    return PeVideoModel.from_pretrained(path, fast=fast, dtype=_resolve_dtype(dtype, device), device=device)


_warned_default_processor: set = set()


def load_processor(path, model=None):
    """The checkpoint's video processor; without a preprocessor config there (e.g. checkpoints written
    by ``model.save_pretrained``), PE's preprocessing at the model's frame size: mean = std = 0.5,
    rescale 1/255, antialiased bilinear resize. Says so once per path."""
    from .processing import PeVideoVideoProcessor

    if path is not None:
        try:
            return PeVideoVideoProcessor.from_pretrained(path)
        except OSError:
            if model is None:
                raise
    if model is None:
        raise ValueError("load_processor needs a checkpoint path with a preprocessor config, or the model")
    h, w = model.video_encoder.vit.args.img_size
    key = os.fspath(path) if path is not None else None
    if key not in _warned_default_processor:
        _warned_default_processor.add(key)
        where = f"{key} has no preprocessor config" if key else "no processor given"
        warnings.warn(f"{where}; using PE Video's default preprocessing at {h}x{w} (mean = std = 0.5, rescale 1/255)",
                      stacklevel=2)
    return PeVideoVideoProcessor(size={"height": h, "width": w})


def _norm_args(processor) -> dict:
    """The processor's rescale + normalize, as ``forward_uint8`` applies them."""
    mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    if processor.do_normalize:
        mean = _three(processor.image_mean)
        std = _three(processor.image_std)
    rescale = float(processor.rescale_factor) if processor.do_rescale else 1.0
    return dict(image_mean=tuple(mean), image_std=tuple(std), rescale_factor=rescale)


def _three(v) -> list[float]:
    return [float(v)] * 3 if isinstance(v, (int, float)) else [float(x) for x in v]


def _check_processor_size(processor, model) -> None:
    """Fail before decoding anything when the processor's output size is not the model's frame size."""
    probe = np.zeros((1, 8, 8, 3), np.uint8)
    got = tuple(_to_model_frames(processor, probe).shape[1:3])
    want = tuple(model.video_encoder.vit.args.img_size)
    if got != want:
        raise ValueError(f"the processor makes {got[0]}x{got[1]} frames but the model takes {want[0]}x{want[1]}")


def _to_model_frames(processor, frames: np.ndarray) -> torch.Tensor:
    """Decoded uint8 frames (T, H, W, 3) -> resized uint8 (T, S, S, 3), exactly the processor's resize/crop."""
    clip = processor(frames, do_sample_frames=False, do_rescale=False, do_normalize=False,
                     input_data_format="channels_last")["pixel_values_videos"][0]
    return clip.permute(0, 2, 3, 1).contiguous()


# --------------------------------------------------------------------------------------------------
# Decoding in workers
# --------------------------------------------------------------------------------------------------
class _ClipDataset(torch.utils.data.Dataset):
    """Item i: the decoded, resized clip of ``paths[i]``, or the reason it could not be read."""

    def __init__(self, paths: Sequence[str], processor, num_frames: int | None, fps: float | None,
                 apply_rotation: bool = False):
        self.paths, self.processor, self.num_frames, self.fps = paths, processor, num_frames, fps
        s = processor._settings({})  # resize each frame as it is decoded, exactly as the processor would
        self.decode = dict(size=s["size"], resample=s["mode"], apply_rotation=apply_rotation)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        from .video import load_video

        path = self.paths[i]
        try:
            frames, meta = load_video(path, num_frames=self.num_frames, fps=self.fps, **self.decode)
            clip = _to_model_frames(self.processor, frames)
            return dict(index=i, path=path, frames=clip, total=int(meta.total_num_frames),
                        indices=list(meta.frames_indices), error=None)
        except Exception as exc:  # one unreadable video is that video's problem, not the run's
            return dict(index=i, path=path, frames=None, total=0, indices=[], error=_reason(exc))


def _reason(exc: Exception) -> str:
    # load_video's own errors already say what is wrong with which file; anything else gets its type.
    if type(exc) in (ValueError, FileNotFoundError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _collate(items: list[dict]) -> dict:
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


def _worker_init(_worker_id: int) -> None:
    # Each worker resizes one clip at a time; many intra-op threads per worker would only fight.
    torch.set_num_threads(1)


def _default_workers() -> int:
    """The CPUs this process may use, shared with the other ranks on this machine, less one for the
    encoding loop; at most 16."""
    try:
        cpus = len(os.sched_getaffinity(0))  # honours container / taskset limits, unlike cpu_count
    except AttributeError:
        cpus = os.cpu_count() or 2
    cpus //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(16, cpus - 1))


# --------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------
@dataclass
class ClipResult:
    """One video's result. ``video_embeds`` (D,) and ``pooled`` (H,) are float32 CPU tensors (``pooled``
    only when asked for); ``frame_count`` is the source video's frame count, ``frame_indices`` the frames
    taken. A video that could not be read has ``error`` set (reason, naming the file) and no tensors."""

    index: int
    path: str
    video_embeds: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    frame_count: int = 0
    frame_indices: list[int] = field(default_factory=list)
    error: str | None = None

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


class _Encoder:
    """Launches a batch on the model's device without waiting for it; collects it one batch later, so
    the device works on batch i while the host fetches batch i+1."""

    def __init__(self, model, processor, pooled: bool):
        self.model, self.pooled = model, pooled
        self.norm = _norm_args(processor)
        self.cuda = model.device.type == "cuda"

    @torch.inference_mode()
    def launch(self, batch: dict):
        if batch["videos"] is None:
            return batch, None, None
        # Videos stay on the host (pinned): the model copies them over without blocking, and checks the
        # mask on the host, so nothing here waits for the device.
        out = self.model.video_encoder.forward_uint8(batch["videos"], batch["mask"], **self.norm)
        tensors = [self.model.video_head(out.pooler_output)]
        if self.pooled:
            tensors.append(out.pooler_output)
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
                           frame_indices=it["indices"], error=it["error"])
            if r.ok:
                r.video_embeds = host[0][row]
                if len(host) > 1:
                    r.pooled = host[1][row]
                row += 1
            results.append(r)
        return results


def _run(paths: Sequence[str], order: Sequence[int], model, processor, *, num_frames, fps, batch_size,
         num_workers, pooled, stats: PipelineStats, progress, apply_rotation=False) -> Iterator[ClipResult]:
    """Encode ``paths[i]`` for i in ``order``; yield results in that order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    num_workers = _default_workers() if num_workers is None else int(num_workers)
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    order = list(order)
    if not order:
        return
    encoder = _Encoder(model, processor, pooled)
    loader = torch.utils.data.DataLoader(
        _ClipDataset(paths, processor, num_frames, fps, apply_rotation),
        batch_sampler=[order[i : i + batch_size] for i in range(0, len(order), batch_size)],
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=encoder.cuda,
        worker_init_fn=_worker_init if num_workers else None,
        # Two batches ahead per worker: enough to hide decode jitter; more only fills shared memory.
        prefetch_factor=2 if num_workers else None,
    )
    bar = _progress_bar(len(order), progress)
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


def _progress_bar(total: int, progress):
    """tqdm on stderr (clips/s, ETA); ``progress=None`` shows it only on a terminal."""
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="clip", file=sys.stderr, dynamic_ncols=True, smoothing=0.05)


def _sampling(num_frames, fps):
    if num_frames is not None and fps is not None:
        raise ValueError("give num_frames or fps, not both")
    if num_frames is None and fps is None:
        num_frames = DEFAULT_NUM_FRAMES
    if num_frames is not None and (isinstance(num_frames, bool) or int(num_frames) != num_frames or num_frames < 1):
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    if fps is not None and not (float(fps) > 0 and math.isfinite(float(fps))):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if num_frames is not None:
        from .video import check_frame_cap

        check_frame_cap(int(num_frames), name="num_frames")
    return (int(num_frames) if num_frames is not None else None), (float(fps) if fps is not None else None)


def _model_and_processor(model, processor, device, dtype, fast):
    """(model, processor, checkpoint folder or None) from a model object or a checkpoint path."""
    from .modeling import PeVideoModel

    path = None
    if isinstance(model, (str, os.PathLike)):
        from .loading import resolve_checkpoint

        path = resolve_checkpoint(model)
        model = load_model(path, device=device, dtype=dtype, fast=fast)
    elif not isinstance(model, PeVideoModel):
        raise TypeError(f"model must be a pevideo PeVideoModel or a checkpoint path, got {type(model).__name__}")
    if processor is None or isinstance(processor, (str, os.PathLike)):
        processor = load_processor(processor if processor is not None else path, model)
    _check_processor_size(processor, model)
    return model, processor, path


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
        model: a :class:`pevideo.PeVideoModel`, or a checkpoint folder / Hub id, loaded with
            :func:`load_model` (``device``, ``dtype``, ``fast`` apply only then).
        processor: a :class:`pevideo.PeVideoVideoProcessor` or a folder to load one from; default: the
            checkpoint's (see :func:`load_processor`).
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
    num_frames, fps = _sampling(num_frames, fps)
    paths = expand_inputs(videos)
    model, processor, _ = _model_and_processor(model, processor, device, dtype, fast)
    return _run(paths, range(len(paths)), model, processor, num_frames=num_frames, fps=fps,
                batch_size=batch_size, num_workers=num_workers, pooled=pooled,
                stats=stats if stats is not None else PipelineStats(), progress=progress,
                apply_rotation=apply_rotation)


# --------------------------------------------------------------------------------------------------
# Zero-shot classification
# --------------------------------------------------------------------------------------------------
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
    needed when ``model`` is an object). Other arguments as :func:`embed_videos`.
    """
    num_frames, fps = _sampling(num_frames, fps)
    paths = expand_inputs(videos)
    model, processor, path = _model_and_processor(model, processor, device, dtype, fast)
    if tokenizer is None:
        if path is None:
            raise ValueError("classify_videos needs tokenizer= when model is a model object")
        tokenizer = load_tokenizer(path)
    text = text_embeddings(model, tokenizer, labels)
    scale = float(model.text_video_logit_scale.float().item())
    bias = float(model.text_video_logit_bias.float().item())
    results = _run(paths, range(len(paths)), model, processor, num_frames=num_frames, fps=fps,
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


def load_tokenizer(path):
    """The checkpoint's tokenizer (``AutoTokenizer``), with an error that says what is missing."""
    from transformers import AutoTokenizer

    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, n)) for n in names):
        raise ValueError(f"{path} has no tokenizer ({' / '.join(names[:2])}); classify needs the checkpoint's tokenizer")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load a tokenizer from {path} (classify needs the checkpoint's tokenizer files): {exc}") from exc


# --------------------------------------------------------------------------------------------------
# Files: layout, manifest, shards
# --------------------------------------------------------------------------------------------------
@dataclass
class _Layout:
    final: str | None  # the single output file, or None when the shards are the output
    work: str  # folder holding manifest.json and the shards
    errors: str  # the errors file (JSONL)

    @classmethod
    def of(cls, out, errors=None) -> "_Layout":
        out = os.fspath(out)
        if out.endswith(".safetensors"):
            default_errors = out[: -len(".safetensors")] + ".errors.jsonl"
            return cls(out, out + ".shards", os.fspath(errors) if errors else default_errors)
        return cls(None, out, os.fspath(errors) if errors else os.path.join(out, "errors.jsonl"))

    @property
    def manifest(self) -> str:
        return os.path.join(self.work, "manifest.json")

    def shard(self, s: int) -> str:
        return os.path.join(self.work, f"shard-{s:05d}.safetensors")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fingerprint(paths, model_id, processor, num_frames, fps, dtype, pooled, shard_size) -> dict:
    """Everything that decides the numbers written (not how fast): a rerun must match it exactly.
    ``processor`` None: PE's default preprocessing at the model's frame size (see :func:`load_processor`)."""
    proc = {"default": True}
    if processor is not None:
        proc = {k: v for k, v in processor.to_dict().items()
                if k not in ("num_frames", "fps", "do_sample_frames", "return_metadata")}
    return {
        "model": model_id,
        "processor": proc,
        "num_frames": num_frames,
        "fps": fps,
        "dtype": str(dtype).replace("torch.", ""),
        "pooled": bool(pooled),
        "shard_size": int(shard_size),
        "num_inputs": len(paths),
        "inputs_sha256": _sha256("\0".join(paths).encode("utf-8", "surrogateescape")),
    }


def _model_id(model) -> dict:
    """A checkpoint folder: its absolute path and config.json's hash; a model object: its config's hash
    and a checksum of a few weights."""
    if isinstance(model, (str, os.PathLike)):
        p = os.fspath(model)
        if os.path.isdir(p):
            cfg = os.path.join(p, "config.json")
            sha = None
            if os.path.isfile(cfg):
                with open(cfg, "rb") as f:
                    sha = _sha256(f.read())
            return {"path": os.path.realpath(p), "config_sha256": sha}
        return {"hub_id": p}
    with torch.no_grad():
        w = model.video_head.proj.weight.double()
        checksum = f"{w.sum().item():.6e}/{w.abs().sum().item():.6e}"
    return {"object": type(model).__name__, "config_sha256": _sha256(model.config.to_json_string().encode()),
            "weights_checksum": checksum}


def _describe_mismatch(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    lines = []
    for k in keys:
        if old.get(k) != new.get(k):
            if k == "inputs_sha256" and old.get("num_inputs") == new.get("num_inputs"):
                lines.append("  inputs: the same number of videos, but a different list")
            elif k != "inputs_sha256":
                lines.append(f"  {k}: was {old.get(k)!r}, now {new.get(k)!r}")
    return "\n".join(lines) or "  (format)"


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{os.path.join(os.path.dirname(path), '.' + os.path.basename(path))}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_atomic(tensors: dict, metadata: dict, path: str) -> None:
    """Write under a temporary name, flush to disk, then rename: a reader sees a complete file or none."""
    from safetensors.torch import save_file

    tmp = f"{os.path.join(os.path.dirname(path), '.' + os.path.basename(path))}.tmp.{os.getpid()}"
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())  # the writer creates 0600 files; make them like any other output
    os.replace(tmp, path)


@functools.lru_cache(maxsize=None)
def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it right back (once per process)
    os.umask(mask)
    return mask


def _read_header(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}


def _shard_ok(path: str, fp_sha: str) -> bool:
    """A finished shard of this run: readable, and made with the same fingerprint."""
    if not os.path.isfile(path):
        return False
    try:
        meta = _read_header(path)
    except Exception:  # a damaged shard (disk full, ...) is redone
        warnings.warn(f"{path} is unreadable; it will be written again", stacklevel=2)
        return False
    return meta.get("format") == FORMAT and meta.get("fingerprint") == fp_sha


def _rows(results: list[ClipResult], dims: tuple[int, int], pooled: bool, width: int) -> dict:
    ok = [r for r in results if r.ok]
    d, h = dims
    t = max([len(r.frame_indices) for r in ok] + [width])
    idx = torch.full((len(ok), t), -1, dtype=torch.int32)
    for i, r in enumerate(ok):
        idx[i, : len(r.frame_indices)] = torch.tensor(r.frame_indices, dtype=torch.int32)
    tensors = {
        "video_embeds": torch.stack([r.video_embeds for r in ok]) if ok else torch.zeros(0, d),
        "frame_counts": torch.tensor([r.frame_count for r in ok], dtype=torch.int64),
        "sampled_indices": idx,
        "input_index": torch.tensor([r.index for r in ok], dtype=torch.int64),
    }
    if pooled:
        tensors["pooled"] = torch.stack([r.pooled for r in ok]) if ok else torch.zeros(0, h)
    return tensors


def _write_shard(layout: _Layout, s: int, results: list[ClipResult], fp_sha: str, dims, pooled, width) -> None:
    errors = [{"index": r.index, "path": r.path, "error": r.error} for r in results if not r.ok]
    meta = {
        "format": FORMAT,
        "version": str(FORMAT_VERSION),
        "fingerprint": fp_sha,
        "shard": str(s),
        "paths": json.dumps([r.path for r in results if r.ok]),
        "errors": json.dumps(errors),
    }
    _save_atomic(_rows(results, dims, pooled, width), meta, layout.shard(s))


# --------------------------------------------------------------------------------------------------
# Reading back
# --------------------------------------------------------------------------------------------------
@dataclass
class Embeddings:
    """What an embedding run wrote, in input order (failed videos have no row).

    video_embeds (N, D) float32; pooled (N, H) float32 or None; frame_counts (N,) int64 (frames in the
    source video); sampled_indices (N, T) int32, −1 where a clip has fewer than T frames; input_index
    (N,) int64, each row's position in the input list; paths: N paths; errors: [{index, path, error}]
    for the videos that failed; config: the run's arguments fingerprint (model, num_frames, ...).
    """

    video_embeds: torch.Tensor
    frame_counts: torch.Tensor
    sampled_indices: torch.Tensor
    input_index: torch.Tensor
    paths: list[str]
    errors: list[dict]
    config: dict
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        pooled = "" if self.pooled is None else f", pooled={tuple(self.pooled.shape)}"
        return (f"Embeddings({len(self)} clips, video_embeds={tuple(self.video_embeds.shape)}{pooled}, "
                f"{len(self.errors)} failed, num_frames={self.config.get('num_frames')})")


def _load_file(path: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    meta = _read_header(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a pevideo embeddings file")
    return load_file(path), meta


def _join(parts: list[tuple[dict, dict]], config: dict) -> Embeddings:
    """Concatenate shards (in order); pad sampled_indices to the widest."""
    width = max((t["sampled_indices"].shape[1] for t, _ in parts), default=0)

    def cat(name):
        ts = [t[name] for t, _ in parts if name in t]
        return torch.cat(ts) if ts else None

    idx = [torch.nn.functional.pad(t["sampled_indices"], (0, width - t["sampled_indices"].shape[1]), value=-1)
           for t, _ in parts]
    paths, errors = [], []
    for _, m in parts:
        paths += json.loads(m.get("paths", "[]"))
        errors += json.loads(m.get("errors", "[]"))
    return Embeddings(
        video_embeds=cat("video_embeds"), pooled=cat("pooled"), frame_counts=cat("frame_counts"),
        sampled_indices=torch.cat(idx) if idx else torch.zeros(0, 0, dtype=torch.int32),
        input_index=cat("input_index"), paths=paths, errors=sorted(errors, key=lambda e: e["index"]), config=config,
    )


def _read_manifest(layout: _Layout) -> dict:
    try:
        with open(layout.manifest, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no embeddings at {layout.final or layout.work} (no manifest {layout.manifest})") from None


def _read_shards(layout: _Layout) -> Embeddings:
    man = _read_manifest(layout)
    missing = [s for s in range(man["num_shards"]) if not _shard_ok(layout.shard(s), man["fingerprint"])]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise ValueError(
            f"{layout.work}: {len(missing)} of {man['num_shards']} shards are missing or unfinished ({shown}); "
            "rerun `pevideo embed` with the same arguments to finish them"
        )
    return _join([_load_file(layout.shard(s)) for s in range(man["num_shards"])], man["config"])


def read_embeddings(path) -> Embeddings:
    """Read an embedding run's output: the ``.safetensors`` file, or the folder of shards (``out`` without
    the suffix). A ``.safetensors`` output whose shards were never joined is read from its shards."""
    layout = _Layout.of(path)
    if layout.final is not None and os.path.isfile(layout.final):
        tensors, meta = _load_file(layout.final)
        return _join([(tensors, meta)], json.loads(meta.get("config", "{}")))
    if layout.final is None and not os.path.isdir(layout.work):
        raise FileNotFoundError(f"no embeddings at {layout.work}")
    return _read_shards(layout)


# --------------------------------------------------------------------------------------------------
# The resumable, sharded run
# --------------------------------------------------------------------------------------------------
@dataclass
class EmbedSummary:
    """What :func:`embed_to_file` did. ``num_failed`` counts videos that could not be read (in this
    run or the finished shards it kept); the ``shards_*`` counts are this process's."""

    out: str
    errors_path: str
    num_inputs: int
    num_embedded: int
    num_failed: int
    num_shards: int
    shards_written: int = 0
    shards_skipped: int = 0
    stats: PipelineStats = field(default_factory=PipelineStats)

    @property
    def exit_status(self) -> int:
        """0 when every video was embedded, 1 when some failed (their outputs are still written)."""
        return 1 if self.num_failed else 0


def _combine(per_rank: list[PipelineStats]) -> PipelineStats:
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


class _Dist:
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


def _prepare(layout: _Layout, fp: dict, fp_sha: str, num_shards: int, overwrite: bool) -> str:
    """Rank 0: check or create the manifest; 'complete' when the joined file is already there."""
    if overwrite:
        _remove_outputs(layout)
    if layout.final is not None and os.path.isfile(layout.final):
        meta = _read_header(layout.final)
        if meta.get("fingerprint") != fp_sha:
            old = json.loads(meta.get("config", "{}"))
            raise ManifestMismatchError(
                f"{layout.final} holds results made with different arguments:\n{_describe_mismatch(old, fp)}\n"
                "use another --out, or --overwrite to replace it"
            )
        return "complete"
    os.makedirs(layout.work, exist_ok=True)
    if os.path.isfile(layout.manifest):
        man = _read_manifest(layout)
        if man.get("fingerprint") != fp_sha:
            raise ManifestMismatchError(
                f"{layout.work} holds results made with different arguments:\n"
                f"{_describe_mismatch(man.get('config', {}), fp)}\nuse another --out, or --overwrite to start over"
            )
    else:
        man = {"format": FORMAT, "version": FORMAT_VERSION, "fingerprint": fp_sha, "config": fp,
               "num_shards": num_shards}
        _atomic_write_text(layout.manifest, json.dumps(man, indent=2) + "\n")
    for name in os.listdir(layout.work):  # leftovers of an interrupted write
        if name.startswith(".shard-") and ".tmp." in name:
            os.remove(os.path.join(layout.work, name))
    return "todo"


def _remove_outputs(layout: _Layout) -> None:
    """Remove what a previous run wrote (only our own file names, never a whole user folder)."""
    for p in (layout.final, layout.errors):
        if p is not None and os.path.isfile(p):
            os.remove(p)
    if os.path.isdir(layout.work):
        for name in os.listdir(layout.work):
            ours = name in ("manifest.json", "errors.jsonl") or (
                name.startswith(("shard-", ".shard-")) and ".safetensors" in name)
            if ours:
                os.remove(os.path.join(layout.work, name))
        if layout.final is not None and not os.listdir(layout.work):
            os.rmdir(layout.work)


def _write_errors(path: str, errors: list[dict]) -> None:
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    _atomic_write_text(path, "".join(json.dumps(e) + "\n" for e in sorted(errors, key=lambda e: e["index"])))


def _summary_of_final(layout: _Layout) -> EmbedSummary:
    """A joined file is complete: (re)write its errors file from its header and sum it up."""
    meta = _read_header(layout.final)
    errs = json.loads(meta.get("errors", "[]"))
    _write_errors(layout.errors, errs)
    n_in = int(meta.get("num_inputs", "0"))
    num_shards = math.ceil(n_in / json.loads(meta.get("config", "{}")).get("shard_size", n_in or 1))
    return EmbedSummary(layout.final, layout.errors, n_in, n_in - len(errs), len(errs), num_shards)


def merge_shards(out, *, keep_shards: bool = False, errors=None) -> EmbedSummary:
    """Finish a run whose shards are all written (e.g. a multi-GPU run stopped before rank 0 joined them).

    ``out`` as given to :func:`embed_to_file`. For a ``.safetensors`` output, joins the shards into it
    (written under a temporary name, then renamed) and removes the shard folder unless ``keep_shards``;
    for a folder output, the shards stay as they are. Either way writes the errors file. Raises
    ValueError naming the shards still missing.
    """
    layout = _Layout.of(out, errors)
    if layout.final is not None and os.path.isfile(layout.final) and not os.path.isdir(layout.work):
        return _summary_of_final(layout)
    man = _read_manifest(layout)
    if layout.final is None:
        # The shards are the output and stay where they are: check them and gather their errors.
        missing = [s for s in range(man["num_shards"]) if not _shard_ok(layout.shard(s), man["fingerprint"])]
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise ValueError(f"{layout.work}: {len(missing)} of {man['num_shards']} shards are missing or unfinished "
                             f"({shown}); rerun `pevideo embed` with the same arguments to finish them")
        errs = []
        for s in range(man["num_shards"]):
            errs += json.loads(_read_header(layout.shard(s)).get("errors", "[]"))
    else:
        emb = _read_shards(layout)
        errs = emb.errors
        tensors = {"video_embeds": emb.video_embeds, "frame_counts": emb.frame_counts,
                   "sampled_indices": emb.sampled_indices, "input_index": emb.input_index}
        if emb.pooled is not None:
            tensors["pooled"] = emb.pooled
        meta = {"format": FORMAT, "version": str(FORMAT_VERSION), "fingerprint": man["fingerprint"],
                "config": json.dumps(man["config"]), "num_inputs": str(man["config"]["num_inputs"]),
                "paths": json.dumps(emb.paths), "errors": json.dumps(errs)}
        _save_atomic(tensors, meta, layout.final)
    _write_errors(layout.errors, errs)
    if layout.final is not None and not keep_shards:
        _remove_outputs(_Layout(None, layout.work, os.path.join(layout.work, "errors.jsonl")))
        if os.path.isdir(layout.work) and not os.listdir(layout.work):
            os.rmdir(layout.work)
    n_in = man["config"]["num_inputs"]
    return EmbedSummary(layout.final or layout.work, layout.errors, n_in, n_in - len(errs), len(errs), man["num_shards"])


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
        model: a checkpoint folder / Hub id (loaded with :func:`load_model` on ``device``/``dtype``/
            ``fast``) or a :class:`pevideo.PeVideoModel`.
        out: ``X.safetensors`` (one file; shards are worked on in ``X.safetensors.shards/``) or a folder
            (the shards are the output). See the module docstring for the contents.
        shard_size: clips per shard, the unit of resumption (and of work split across ranks).
        errors: the errors file (JSONL ``{"index", "path", "error"}``); default ``X.errors.jsonl`` or
            ``folder/errors.jsonl``. It is always written, empty when nothing failed.
        overwrite: remove a previous run's outputs first (else a run with different arguments is
            refused with :class:`ManifestMismatchError`, and one with the same arguments resumes).
        keep_shards: keep the shard folder after joining a ``.safetensors`` output.
        on_error: called with each failed :class:`ClipResult` as it happens (the CLI prints them).
        on_shard: called with each shard number once that shard is on disk.
        Other arguments as :func:`embed_videos`.

    Under torchrun (WORLD_SIZE > 1) rank r takes shards s with s % WORLD_SIZE == r on cuda:LOCAL_RANK
    (or CPU, with gloo), and rank 0 joins them after all ranks are done. Returns an
    :class:`EmbedSummary`; ``summary.exit_status`` is 1 when any video failed.
    """
    num_frames, fps = _sampling(num_frames, fps)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    paths = expand_inputs(inputs)
    layout = _Layout.of(out, errors)
    if layout.final is not None:
        size = sum(len(p.encode("utf-8", "surrogateescape")) + 4 for p in paths)
        if size > _MAX_HEADER_JSON:
            raise ValueError(f"{len(paths)} paths are too many for one safetensors file's header; give a folder as "
                             "the output (no .safetensors suffix) to keep the shards")
    from .modeling import PeVideoModel

    if isinstance(model, (str, os.PathLike)):
        from .loading import resolve_checkpoint

        model = resolve_checkpoint(model)
        device = _resolve_device(device)
    elif isinstance(model, PeVideoModel):
        device = model.device
    else:
        raise TypeError(f"model must be a pevideo PeVideoModel or a checkpoint path, got {type(model).__name__}")
    dist = _Dist(device)
    try:
        loaded = not isinstance(model, str)
        model_dtype = model.dtype if loaded else _resolve_dtype(dtype, dist.device)
        if isinstance(processor, (str, os.PathLike)):
            processor = load_processor(processor)
        elif processor is None and not loaded:
            try:
                processor = load_processor(model)
            except OSError:
                pass  # no preprocessor config: the default one, at the frame size of the model once loaded
        fp = _fingerprint(paths, _model_id(model), processor, num_frames, fps, model_dtype, pooled, shard_size)
        if apply_rotation:  # only when on, so that earlier runs' outputs keep their fingerprint
            fp["apply_rotation"] = True
        fp_sha = _sha256(json.dumps(fp, sort_keys=True).encode())
        num_shards = math.ceil(len(paths) / shard_size)
        if dist.on_rank0(_prepare, layout, fp, fp_sha, num_shards, overwrite) == "complete":
            # Same arguments, already joined: nothing to do but restore the errors file if it was lost.
            summary = dist.on_rank0(_summary_of_final, layout)
            summary.shards_skipped = num_shards
            return summary

        mine = [s for s in range(num_shards) if s % dist.world == dist.rank]
        todo = [s for s in mine if not _shard_ok(layout.shard(s), fp_sha)]
        stats = PipelineStats()
        if todo:
            model, processor, _ = _model_and_processor(model, processor, dist.device, model_dtype, fast)
            _encode_shards(paths, todo, layout, model, processor, fp_sha, shard_size=shard_size,
                           num_frames=num_frames, fps=fps, batch_size=batch_size, num_workers=num_workers,
                           pooled=pooled, stats=stats, progress=progress if dist.rank == 0 else False,
                           on_error=on_error, on_shard=on_shard, apply_rotation=apply_rotation)
        # Also the barrier: after it, every rank's shards are on disk.
        ranks = dist.gather((len(todo), len(mine) - len(todo), stats))
        summary = dist.on_rank0(merge_shards, out, keep_shards=keep_shards, errors=errors)
        summary.shards_written = sum(r[0] for r in ranks)
        summary.shards_skipped = sum(r[1] for r in ranks)
        summary.stats = _combine([r[2] for r in ranks])
        return summary
    finally:
        dist.close()


def _encode_shards(paths, todo, layout, model, processor, fp_sha, *, shard_size, num_frames, fps, batch_size,
                   num_workers, pooled, stats, progress, on_error, on_shard, apply_rotation=False) -> None:
    """Encode the clips of shards ``todo``; write each shard as soon as its last clip is in."""
    dims = (model.config.text_config.hidden_size, model.config.video_config.hidden_size)
    order = [i for s in todo for i in range(s * shard_size, min((s + 1) * shard_size, len(paths)))]
    results = _run(paths, order, model, processor, num_frames=num_frames, fps=fps, batch_size=batch_size,
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
                _write_shard(layout, s, buf, fp_sha, dims, pooled, num_frames or 0)
                buf = []
                if on_shard is not None:
                    on_shard(s)
    finally:
        results.close()  # stop the decoder pool now, also when interrupted
