"""A run's fingerprint: everything that decides the numbers an embedding run writes (weights, config,
preprocessing, sampling, dtype, kernels, inputs), so that a rerun resumes only a run whose finished
shards it would have written identically, and refuses (or, with ``--overwrite``, starts over) otherwise.

Not in it: what changes only speed or where the work happens (batch size, workers, device, ranks).

Weights: for a checkpoint folder, each weight file's name and size, plus for a file up to
``FULL_HASH_BYTES`` a SHA-256 of its content, and for a larger one its safetensors header's SHA-256
and its modification time (reading gigabytes on every start would not be cheap). So weights saved
again (other values, same config) never count as the same; a large checkpoint copied without keeping
modification times (``cp`` rather than ``cp -p`` / ``rsync -a``) counts as different too. For a model
object: its config, and per tensor a sample of its values and the sums of their absolute values.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch

__all__ = ["fingerprint", "model_id", "weights_id", "describe_mismatch", "sha256"]

FULL_HASH_BYTES = 64 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(paths, model_id, processor, num_frames, fps, dtype, pooled, shard_size, *, fast: bool,
                **options) -> dict:
    """The run's fingerprint (JSON-able). ``processor`` None: PE's default preprocessing at the model's
    frame size (decided by the config, which ``model_id`` covers). ``fast``: the fused kernels, as the
    model will run (resolved, not None). ``options``: any other argument that changes decoded frames or
    outputs (e.g. applying rotation metadata); each is recorded under its name."""
    from .. import __version__

    proc = {"default": True}
    if processor is not None:
        proc = {k: v for k, v in processor.to_dict().items()
                if k not in ("num_frames", "fps", "do_sample_frames", "return_metadata")}
    fp = {
        "pevideo": __version__,
        "model": model_id,
        "processor": proc,
        "num_frames": num_frames,
        "fps": fps,
        "dtype": str(dtype).replace("torch.", ""),
        "fast": bool(fast),
        "pooled": bool(pooled),
        "shard_size": int(shard_size),
        "num_inputs": len(paths),
        "inputs_sha256": sha256("\0".join(paths).encode("utf-8", "surrogateescape")),
    }
    if fps is not None:  # fps picks frames by upstream's rule (pevideo.sampling); earlier fps runs took others
        fp["fps_rule"] = "upstream"
    for k, v in sorted(options.items()):
        if k in fp:
            raise ValueError(f"fingerprint option {k!r} clashes with a fixed field")
        fp[k] = v
    return json.loads(json.dumps(fp))  # as it reads back from a manifest (tuples -> lists, ...)


def model_id(model) -> dict:
    """A checkpoint folder: its absolute path, config.json's hash and :func:`weights_id`; a model object:
    its config's hash and a digest of its tensors."""
    if isinstance(model, (str, os.PathLike)):
        p = os.fspath(model)
        if os.path.isdir(p):
            cfg = os.path.join(p, "config.json")
            sha = None
            if os.path.isfile(cfg):
                with open(cfg, "rb") as f:
                    sha = sha256(f.read())
            return {"path": os.path.realpath(p), "config_sha256": sha, "weights": weights_id(p)}
        return {"hub_id": p}
    return {"object": type(model).__name__, "config_sha256": sha256(model.config.to_json_string().encode()),
            "weights_digest": tensors_digest(model)}


def weights_id(folder: str) -> dict:
    """``{file name: identity}`` of the weight files directly in ``folder`` (see the module docstring)."""
    out = {}
    for name in sorted(os.listdir(folder)):
        full = os.path.join(folder, name)
        if not name.endswith(WEIGHT_SUFFIXES) or not os.path.isfile(full):
            continue
        st = os.stat(full)
        ident = {"size": st.st_size}
        if st.st_size <= FULL_HASH_BYTES:
            h = hashlib.sha256()
            with open(full, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            ident["sha256"] = h.hexdigest()
        else:
            ident["mtime_ns"] = st.st_mtime_ns
            if name.endswith(".safetensors"):
                ident["header_sha256"] = _safetensors_header_sha(full)
        out[name] = ident
    return out


def _safetensors_header_sha(path: str) -> str | None:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None
        n = int.from_bytes(head, "little")
        if n > 100_000_000:
            return None
        return sha256(head + f.read(n))


@torch.no_grad()
def tensors_digest(model) -> str:
    """Per tensor: name, shape, dtype, up to 1024 evenly spaced values (exact bytes) and the float64 sum of
    absolute values (6 significant digits: a change anywhere in a tensor shows up, rounding does not)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 1024)
        sample = flat[::step][:1024].to("cpu", torch.float64).numpy().tobytes()
        total = flat.double().abs().sum().item() if flat.numel() else 0.0
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|{total:.6e}|".encode())
        h.update(sample)
    return h.hexdigest()


def describe_mismatch(old: dict, new: dict) -> str:
    """The fields that differ, one per line (indented), readably."""
    lines = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if k == "inputs_sha256":
            if old.get("num_inputs") == new.get("num_inputs"):
                lines.append("  inputs: the same number of videos, but a different list")
        elif k == "model" and isinstance(a, dict) and isinstance(b, dict):
            lines.extend(_describe_model(a, b))
        else:
            lines.append(f"  {k}: was {a!r}, now {b!r}")
    return "\n".join(lines) or "  (format)"


def _describe_model(a: dict, b: dict) -> list[str]:
    lines = []
    if a.get("path") != b.get("path") or a.get("hub_id") != b.get("hub_id"):
        lines.append(f"  model: was {a.get('path') or a.get('hub_id') or a.get('object')!r}, "
                     f"now {b.get('path') or b.get('hub_id') or b.get('object')!r}")
    if a.get("config_sha256") != b.get("config_sha256"):
        lines.append("  model config: config.json differs")
    wa, wb = a.get("weights"), b.get("weights")
    if wa != wb:
        if isinstance(wa, dict) and isinstance(wb, dict):
            changed = sorted(n for n in set(wa) | set(wb) if wa.get(n) != wb.get(n))
            lines.append(f"  model weights: {', '.join(changed)} changed (saved again, or other weights)")
        else:
            lines.append("  model weights: not recorded by the earlier run (made by an older pevideo)")
    if a.get("weights_digest") != b.get("weights_digest"):
        lines.append("  model weights: the model object's tensors differ")
    return lines or [f"  model: was {a!r}, now {b!r}"]
