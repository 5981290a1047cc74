"""The Ray Data stages behind :mod:`pevideo.ray_data` (their public face and its docs): decode on CPU
workers, encode on GPU actors, with ``pevideo embed``'s own decoding and encoding code."""
from __future__ import annotations

import json
import warnings

import numpy as np
import torch

from .encode import ClipResult, Encoder
from .fingerprint import fingerprint, model_id
from .inputs import expand_inputs
from .parquet import results_table, row_fingerprint
from .session import check_sampling, open_session
from .workers import ClipDataset, collate
from ..limits import Limits

__all__ = ["Decode", "Encode", "video_dataset", "embed_dataset"]

# What one decode task needs beside its clips' frames (PyAV, the decoder's buffers, the interpreter).
DECODE_OVERHEAD_BYTES = 256 << 20
# Frames assumed per clip when sampling by rate (their number depends on each video's length).
FPS_FRAMES_ESTIMATE = 64


# The fields of a run's fingerprint that the encoder decides (or that are not per row); the rest is decoding's.
_ENCODE_SIDE = ("pevideo", "model", "dtype", "fast", "pooled", "shard_size", "num_inputs", "inputs_sha256")


def decode_config(processor, num_frames, fps, apply_rotation: bool) -> dict:
    """What decides the frames, as the run fingerprint records it: the processor's settings, the
    sampling (and its rule), and rotation (recorded only when on, as ``pevideo embed`` does)."""
    fp = fingerprint([], None, processor, num_frames, fps, "-", False, 0, fast=False,
                     **({"apply_rotation": True} if apply_rotation else {}))
    return {k: v for k, v in fp.items() if k not in _ENCODE_SIDE}


class Decode:
    """CPU stage: a batch of ``path`` (and ``input_index``) to sampled, resized uint8 frames.

    Args:
        model: the checkpoint folder / Hub id (or model) whose processor and frame size to use; nothing
            is loaded but the processor settings.
        processor, num_frames, fps, apply_rotation: as for ``pevideo embed`` (default 16 frames).

    Output columns: ``path``, ``input_index`` (int64; the batch position when the input has none),
    ``frames`` (per row uint8 (T, S, S, 3); (0, S, S, 3) for a failed video), ``source_frame_count``,
    ``frame_indices`` (int32, the source frames taken), ``error`` ("" when read), ``truncated_suspect``
    ("" unless the file may be cut short where nothing declares its length) and ``decode_config``
    (JSON, which :class:`Encode` checks against its own preprocessing and puts in the fingerprint).
    An input row with a non-empty ``error`` (:func:`video_dataset`'s ``errors``) is not decoded: it
    passes through as that video's failure.
    """

    def __init__(self, model, *, processor=None, num_frames: int | None = None, fps: float | None = None,
                 apply_rotation: bool = False):
        self.sampling = check_sampling(num_frames, fps)
        session = open_session(model, processor, device="cpu", dtype="float32", fast=False, sampling=self.sampling)
        self.processor, self.apply_rotation = session.processor, bool(apply_rotation)
        self.limits = Limits.resolve()  # this process's, carried to every worker (their environments may differ)
        self.frame_size = tuple(session.frame_size)
        self.config = json.dumps(decode_config(self.processor, self.sampling.num_frames, self.sampling.fps,
                                               self.apply_rotation), sort_keys=True)

    def task_memory(self, clips: int) -> int:
        """Bytes a task decoding ``clips`` videos holds: their uint8 frames at the model's frame size
        (``FPS_FRAMES_ESTIMATE`` frames a clip when sampling by rate) and the decoder's own."""
        h, w = self.frame_size
        frames = self.sampling.num_frames or FPS_FRAMES_ESTIMATE
        return int(DECODE_OVERHEAD_BYTES + clips * frames * h * w * 3)

    def __call__(self, batch: dict) -> dict:
        paths = [str(p) for p in batch["path"]]
        index = np.asarray(batch["input_index"] if "input_index" in batch else np.arange(len(paths)), np.int64)
        given = [str(e or "") for e in batch["error"]] if "error" in batch else [""] * len(paths)
        clips = ClipDataset(paths, self.processor, self.sampling, self.apply_rotation, limits=self.limits)
        frames = np.empty(len(paths), dtype=object)
        taken = np.empty(len(paths), dtype=object)
        totals, errors, suspects = np.zeros(len(paths), np.int64), [], []
        for i in range(len(paths)):
            # the very item pevideo embed's decoding workers make, or the failure the input carries
            it = dict(error=given[i], indices=[], total=0) if given[i] else clips[i]
            if it["error"] is None:
                frames[i] = np.ascontiguousarray(it["frames"].numpy())
            else:
                frames[i] = np.zeros((0, *self.frame_size, 3), np.uint8)
            taken[i] = np.asarray(it["indices"], np.int32)
            totals[i] = it["total"]
            errors.append(it["error"] or "")
            suspects.append(it.get("truncated_suspect") or "")
        return {"path": np.array(paths, dtype=object), "input_index": index, "frames": frames,
                "source_frame_count": totals, "frame_indices": taken, "error": np.array(errors, dtype=object),
                "truncated_suspect": np.array(suspects, dtype=object),
                "decode_config": np.array([self.config] * len(paths), dtype=object)}


class Encode:
    """GPU stage: a callable class holding the model, for ``map_batches(Encode, fn_constructor_args=
    (model,), concurrency=N, num_gpus=...)``; each batch (as :class:`Decode` makes it) to Parquet rows
    (a pyarrow Table, schema :func:`pevideo.embed.parquet.schema`).

    Args:
        model: checkpoint folder / Hub id (loaded once per actor) or a :class:`pevideo.PeVideoModel`.
        processor: default the checkpoint's; it must be the one :class:`Decode` used (checked per batch).
        device: default CUDA when the actor has a GPU, else CPU; dtype: default bf16 on a GPU, fp32 on
            CPU; fast: default the fused kernels on a GPU. pooled: also write the encoder's pooled output.

    Each row's ``fingerprint`` is the SHA-256 of the model's identity (config, weight files), the
    preprocessing, sampling, dtype and kernels: rows made with other weights or settings never mix.
    """

    def __init__(self, model, *, processor=None, device=None, dtype=None, fast: bool | None = None,
                 pooled: bool = False):
        session = open_session(model, processor, device=device, dtype=dtype, fast=fast)
        self.session, self.pooled = session, bool(pooled)
        self.model = session.model()
        self.encoder = Encoder(self.model, session.processor, self.pooled)
        cfg = self.model.config
        self.dim, self.pooled_dim = cfg.text_config.hidden_size, cfg.video_config.hidden_size if pooled else None
        self._model_id = model_id(session.source)
        self._fingerprints: dict[str, str] = {}

    def fingerprint(self, decode_json: str) -> str:
        """The rows' fingerprint for frames decoded with ``decode_json`` (a :class:`Decode` ``config``)."""
        fp = self._fingerprints.get(decode_json)
        if fp is None:
            dec = json.loads(decode_json)
            s = self.session
            base = fingerprint([], self._model_id, s.processor, dec.get("num_frames"), dec.get("fps"), s.dtype,
                               self.pooled, 0, fast=s.fast)
            clash = [k for k, v in dec.items() if k in base and base[k] != v]
            if clash:
                raise ValueError(f"the frames were decoded with other settings ({', '.join(clash)}) than this model's "
                                 f"({[dec[k] for k in clash]} vs {[base[k] for k in clash]}): give Decode and Encode "
                                 "the same processor")
            fp = self._fingerprints[decode_json] = row_fingerprint({**base, **dec})
        return fp

    def __call__(self, batch: dict):
        configs = set(batch["decode_config"])
        if len(configs) != 1:
            raise ValueError("a batch holds frames decoded with different settings")
        fp = self.fingerprint(next(iter(configs)))
        items = []
        for i in range(len(batch["path"])):
            err = batch["error"][i] or None
            suspect = batch["truncated_suspect"][i] if "truncated_suspect" in batch else None
            items.append(dict(index=int(batch["input_index"][i]), path=str(batch["path"][i]),
                              frames=None if err else torch.from_numpy(np.asarray(batch["frames"][i])),
                              total=int(batch["source_frame_count"][i]),
                              indices=[int(x) for x in batch["frame_indices"][i]], error=err,
                              truncated_suspect=suspect or None))
        with warnings.catch_warnings():  # Ray's arrays are read-only; collate copies them into the batch
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            batch_in = collate(items)
        results: list[ClipResult] = Encoder.collect(self.encoder.launch(batch_in))
        return results_table(results, fp, self.dim, self.pooled_dim)


def video_dataset(inputs, *, skip=(), errors=None):
    """A Ray dataset of ``path`` and ``input_index`` (position in the expanded input list) over video
    files, folders and list files (see :func:`pevideo.embed.expand_inputs`); ``skip``: input indices
    to leave out (done already); ``errors``: ``{input index: reason}``, inputs :class:`Decode` passes
    through as failed without decoding them (an ``error`` column)."""
    import ray.data

    paths = expand_inputs(inputs)
    skip, errors = set(skip), dict(errors or {})
    items = [{"path": p, "input_index": i} for i, p in enumerate(paths) if i not in skip]
    if errors:
        items = [{**it, "error": errors.get(it["input_index"], "")} for it in items]
    return ray.data.from_items(items)


def embed_dataset(ds, model, *, processor=None, num_frames: int | None = None, fps: float | None = None,
                  apply_rotation: bool = False, batch_size: int = 8, pooled: bool = False, dtype=None,
                  fast: bool | None = None, decoders: int | None = None, decode_batch: int = 2,
                  encoders: int = 1, gpus_per_encoder: float = 0, cpus_per_encoder: float = 1,
                  decode_retries: int | None = None, decode_cls=Decode, encode_cls=Encode):
    """``ds`` (``path``, ``input_index``) through :class:`Decode` and :class:`Encode`: the dataset of
    Parquet rows (write it with ``write_parquet``).

    ``decoders``: decode tasks at once (None: as many as free CPUs allow, one CPU each);
    ``decode_batch``: videos per decode task; ``encoders``: model copies (actors), each with
    ``gpus_per_encoder`` GPUs (fractions pack several per GPU; 0: on CPU) and ``cpus_per_encoder``
    CPUs; ``batch_size``: clips per encoder call; ``decode_retries``: tries after the first of a decode
    task whose worker died (None: Ray's default, without end; a file that crashes the decoder process
    is then tried until the job is stopped). ``decode_cls`` / ``encode_cls``: subclasses to use."""
    decode = decode_cls(model, processor=processor, num_frames=num_frames,
                        fps=fps, apply_rotation=apply_rotation)
    device = "cuda" if gpus_per_encoder else "cpu"
    # The memory a decode task holds (its clips' frames, the decoder) is reserved; that also keeps Ray from
    # fusing this stage into the encoder's actors when both ask for one CPU (CPU-only clusters).
    from ray.data import ActorPoolStrategy

    with warnings.catch_warnings():  # Ray 2.60 deprecates its remote-args catch-all, max_retries has no other
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        ds = ds.map_batches(decode, batch_size=decode_batch, num_cpus=1, memory=decode.task_memory(decode_batch),
                            **_max_retries(decode_retries), **_task_pool(decoders))
    return ds.map_batches(encode_cls, fn_constructor_args=(model,),
                          fn_constructor_kwargs=dict(processor=decode.processor, device=device, dtype=dtype, fast=fast,
                                                     pooled=pooled),
                          batch_size=batch_size, compute=ActorPoolStrategy(size=encoders),
                          num_gpus=gpus_per_encoder or None, num_cpus=cpus_per_encoder)


def _max_retries(n: int | None) -> dict:
    """Ray's ``max_retries`` for a task stage, where this Ray's ``map_batches`` takes it."""
    import inspect

    from ray.data import Dataset

    params = inspect.signature(Dataset.map_batches).parameters
    takes = "max_retries" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    if n is None:
        return {}
    if not takes:
        warnings.warn("this Ray's map_batches takes no max_retries: a decode task whose worker dies is tried "
                      "without end (Ray's default)")
        return {}
    return {"max_retries": int(n)}


def _task_pool(size: int | None) -> dict:
    """At most ``size`` tasks at once (None: as resources allow), in the spelling this Ray takes."""
    if size is None:
        return {}
    try:
        from ray.data import TaskPoolStrategy
    except ImportError:  # older Ray: the concurrency argument (deprecated since 2.51)
        return {"concurrency": size}
    return {"compute": TaskPoolStrategy(size=size)}
