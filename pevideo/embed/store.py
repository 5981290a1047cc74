"""What a run writes and reads back: safetensors shards, the manifest (the run's fingerprint), the errors
file, joining shards into one file (``merge_shards``) and reading results (``read_embeddings``)."""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field

import torch

from .encode import ClipResult, PipelineStats

__all__ = ["read_embeddings", "merge_shards", "Embeddings", "EmbedSummary", "ManifestMismatchError"]

FORMAT = "pevideo.embeddings"
FORMAT_VERSION = 1
DEFAULT_SHARD_SIZE = 1024

# The safetensors header (where paths and errors go) is limited to 100 MB by its readers; stay well below.
MAX_HEADER_JSON = 40_000_000


class ManifestMismatchError(ValueError):
    """An output folder or file holds results made with different arguments (model, frames, inputs, ...)."""


@dataclass
class Layout:
    final: str | None  # the single output file, or None when the shards are the output
    work: str  # folder holding manifest.json and the shards
    errors: str  # the errors file (JSONL)

    @classmethod
    def of(cls, out, errors=None) -> "Layout":
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


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(paths, model_id, processor, num_frames, fps, dtype, pooled, shard_size) -> dict:
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
        "inputs_sha256": sha256("\0".join(paths).encode("utf-8", "surrogateescape")),
    }


def model_id(model) -> dict:
    """A checkpoint folder: its absolute path and config.json's hash; a model object: its config's hash
    and a checksum of a few weights."""
    if isinstance(model, (str, os.PathLike)):
        p = os.fspath(model)
        if os.path.isdir(p):
            cfg = os.path.join(p, "config.json")
            sha = None
            if os.path.isfile(cfg):
                with open(cfg, "rb") as f:
                    sha = sha256(f.read())
            return {"path": os.path.realpath(p), "config_sha256": sha}
        return {"hub_id": p}
    with torch.no_grad():
        w = model.video_head.proj.weight.double()
        checksum = f"{w.sum().item():.6e}/{w.abs().sum().item():.6e}"
    return {"object": type(model).__name__, "config_sha256": sha256(model.config.to_json_string().encode()),
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


def shard_ok(path: str, fp_sha: str) -> bool:
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
        "source_frame_counts": torch.tensor([r.frame_count for r in ok], dtype=torch.int64),
        "sampled_frame_counts": torch.tensor([len(r.frame_indices) for r in ok], dtype=torch.int64),
        "sampled_indices": idx,
        "input_index": torch.tensor([r.index for r in ok], dtype=torch.int64),
    }
    if pooled:
        tensors["pooled"] = torch.stack([r.pooled for r in ok]) if ok else torch.zeros(0, h)
    return tensors


def write_shard(layout: Layout, s: int, results: list[ClipResult], fp_sha: str, dims, pooled, width) -> None:
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


@dataclass
class Embeddings:
    """What an embedding run wrote, in input order (failed videos have no row).

    video_embeds (N, D) float32; pooled (N, H) float32 or None; source_frame_counts (N,) int64 (frames
    in the source video, as its container reports them); sampled_frame_counts (N,) int64 (frames taken
    from it and encoded); sampled_indices (N, T) int32, −1 where a clip has fewer than T frames; input_index
    (N,) int64, each row's position in the input list; paths: N paths; errors: [{index, path, error}]
    for the videos that failed; config: the run's arguments fingerprint (model, num_frames, ...).
    """

    video_embeds: torch.Tensor
    source_frame_counts: torch.Tensor
    sampled_frame_counts: torch.Tensor
    sampled_indices: torch.Tensor
    input_index: torch.Tensor
    paths: list[str]
    errors: list[dict]
    config: dict
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def frame_counts(self) -> torch.Tensor:
        """The old name of ``source_frame_counts`` (frames in the source video, not the frames sampled)."""
        return self.source_frame_counts

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
    # Files written before the two counts had their names hold "frame_counts" (the source's count) only;
    # their sampled counts are the sampled indices that are not padding.
    source = [t.get("source_frame_counts", t.get("frame_counts")) for t, _ in parts]
    sampled = [t["sampled_frame_counts"] if "sampled_frame_counts" in t else (t["sampled_indices"] >= 0).sum(1)
               for t, _ in parts]
    paths, errors = [], []
    for _, m in parts:
        paths += json.loads(m.get("paths", "[]"))
        errors += json.loads(m.get("errors", "[]"))
    return Embeddings(
        video_embeds=cat("video_embeds"), pooled=cat("pooled"),
        source_frame_counts=torch.cat(source) if source else torch.zeros(0, dtype=torch.int64),
        sampled_frame_counts=torch.cat(sampled) if sampled else torch.zeros(0, dtype=torch.int64),
        sampled_indices=torch.cat(idx) if idx else torch.zeros(0, 0, dtype=torch.int32),
        input_index=cat("input_index"), paths=paths, errors=sorted(errors, key=lambda e: e["index"]), config=config,
    )


def _read_manifest(layout: Layout) -> dict:
    try:
        with open(layout.manifest, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no embeddings at {layout.final or layout.work} (no manifest {layout.manifest})") from None


def _check_all_shards(layout: Layout, man: dict) -> None:
    """Raise ValueError naming the shards of the manifest's run that are not (yet) on disk."""
    missing = [s for s in range(man["num_shards"]) if not shard_ok(layout.shard(s), man["fingerprint"])]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise ValueError(
            f"{layout.work}: {len(missing)} of {man['num_shards']} shards are missing or unfinished ({shown}); "
            "rerun `pevideo embed` with the same arguments to finish them"
        )


def _read_shards(layout: Layout) -> Embeddings:
    man = _read_manifest(layout)
    _check_all_shards(layout, man)
    return _join([_load_file(layout.shard(s)) for s in range(man["num_shards"])], man["config"])


def read_embeddings(path) -> Embeddings:
    """Read an embedding run's output: the ``.safetensors`` file, or the folder of shards (``out`` without
    the suffix). A ``.safetensors`` output whose shards were never joined is read from its shards."""
    layout = Layout.of(path)
    if layout.final is not None and os.path.isfile(layout.final):
        tensors, meta = _load_file(layout.final)
        return _join([(tensors, meta)], json.loads(meta.get("config", "{}")))
    if layout.final is None and not os.path.isdir(layout.work):
        raise FileNotFoundError(f"no embeddings at {layout.work}")
    return _read_shards(layout)


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


def prepare(layout: Layout, fp: dict, fp_sha: str, num_shards: int, overwrite: bool) -> str:
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


def _remove_outputs(layout: Layout) -> None:
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


def summary_of_final(layout: Layout) -> EmbedSummary:
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
    layout = Layout.of(out, errors)
    if layout.final is not None and os.path.isfile(layout.final) and not os.path.isdir(layout.work):
        return summary_of_final(layout)
    man = _read_manifest(layout)
    if layout.final is None:
        # The shards are the output and stay where they are: check them and gather their errors.
        _check_all_shards(layout, man)
        errs = []
        for s in range(man["num_shards"]):
            errs += json.loads(_read_header(layout.shard(s)).get("errors", "[]"))
    else:
        emb = _read_shards(layout)
        errs = emb.errors
        tensors = {"video_embeds": emb.video_embeds, "source_frame_counts": emb.source_frame_counts,
                   "sampled_frame_counts": emb.sampled_frame_counts,
                   "sampled_indices": emb.sampled_indices, "input_index": emb.input_index}
        if emb.pooled is not None:
            tensors["pooled"] = emb.pooled
        meta = {"format": FORMAT, "version": str(FORMAT_VERSION), "fingerprint": man["fingerprint"],
                "config": json.dumps(man["config"]), "num_inputs": str(man["config"]["num_inputs"]),
                "paths": json.dumps(emb.paths), "errors": json.dumps(errs)}
        _save_atomic(tensors, meta, layout.final)
    _write_errors(layout.errors, errs)
    if layout.final is not None and not keep_shards:
        _remove_outputs(Layout(None, layout.work, os.path.join(layout.work, "errors.jsonl")))
        if os.path.isdir(layout.work) and not os.listdir(layout.work):
            os.rmdir(layout.work)
    n_in = man["config"]["num_inputs"]
    return EmbedSummary(layout.final or layout.work, layout.errors, n_in, n_in - len(errs), len(errs), man["num_shards"])


