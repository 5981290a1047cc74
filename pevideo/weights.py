"""A checkpoint's weights files: which files, what they hold (names, shapes, dtypes, from the headers
alone), and each tensor read on demand.

What would load ambiguously is refused here, naming the tensor and the files: one tensor in two shards
with different values (with the same bytes it is one tensor, stored twice, and loads). A garbage
``*.index.json`` is refused naming the file and the field.
"""
from __future__ import annotations

import json
import os

import torch

from .errors import CheckpointConfigError, CheckpointMismatchError

__all__ = ["Weights", "weight_files", "read_state_dict", "is_float_dtype", "dtype_name", "SAFE_INDEX"]

SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_WEIGHTS, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"

# safetensors' dtype codes, as torch names them (for messages)
_ST_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
             "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
             "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def dtype_name(dtype) -> str:
    """A dtype (torch's or a safetensors code) as torch names it: "int64", "bool", "float32", ..."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).replace("torch.", "")
    return _ST_NAMES.get(str(dtype), str(dtype))


def is_float_dtype(dtype) -> bool:
    if isinstance(dtype, torch.dtype):
        return dtype.is_floating_point
    return dtype_name(dtype).startswith(("float", "bfloat"))


def _with_variant(name: str, variant: str | None) -> str:
    """transformers' file names for a variant: model.safetensors -> model.fp16.safetensors."""
    if not variant:
        return name
    parts = name.split(".")
    return ".".join(parts[:-1] + [variant] + parts[-1:])


def _json_kind(v) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(v), "null" if v is None else type(v).__name__)


def _read_index(path: str, name: str) -> list[str]:
    """The shard files a ``*.index.json`` lists, checked: a JSON object whose ``weight_map`` maps tensor
    names to files inside the folder (a garbage index names itself and the field, not a KeyError)."""
    full = os.path.join(path, name)
    try:
        with open(full, encoding="utf-8") as f:
            index = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointConfigError(f"{full}: not valid JSON ({exc})") from None
    if not isinstance(index, dict):
        raise CheckpointConfigError(f"{full}: expected a JSON object with a 'weight_map', got a JSON {_json_kind(index)}")
    wm = index.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        got = "nothing" if "weight_map" not in index else ("an empty object" if wm == {} else f"a JSON {_json_kind(wm)}")
        raise CheckpointConfigError(f"{full}: field 'weight_map' must map tensor names to shard files, got {got}")
    for key, fn in wm.items():
        ok = isinstance(fn, str) and fn.strip() and not os.path.isabs(fn)
        if ok:
            norm = os.path.normpath(fn)
            ok = norm not in (".", "..") and not norm.startswith(".." + os.sep)
        if not ok:
            raise CheckpointConfigError(
                f"{full}: field weight_map[{key!r}] must name a shard file inside the checkpoint folder, got {json.dumps(fn)}")
    files = sorted(set(wm.values()))
    missing = [x for x in files if not os.path.isfile(os.path.join(path, x))]
    if missing:
        raise FileNotFoundError(f"checkpoint {path!r} is missing shard file(s) {missing} listed in {name}")
    return files


def weight_files(path: str, *, use_safetensors: bool | None = None, variant: str | None = None) -> list[str]:
    """The checkpoint's weight files, as transformers picks them: safetensors first (sharded or one
    file), then PyTorch .bin; ``use_safetensors=True`` takes safetensors only, ``False`` .bin only;
    ``variant`` "fp16" reads model.fp16.safetensors (and the index model.safetensors.index.fp16.json)."""
    kinds = []
    if use_safetensors is not False:
        kinds.append((SAFE_INDEX, SAFE_WEIGHTS))
    if use_safetensors is not True:
        kinds.append((BIN_INDEX, BIN_WEIGHTS))
    for index, single in kinds:
        index, single = _with_variant(index, variant), _with_variant(single, variant)
        if os.path.isfile(os.path.join(path, index)):
            return _read_index(path, index)
        if os.path.isfile(os.path.join(path, single)):
            return [single]
    wanted = " or ".join(_with_variant(s, variant) + " (or its sharded index)" for _, s in kinds)
    why = " (use_safetensors=True)" if use_safetensors is True else " (use_safetensors=False)" if use_safetensors is False else ""
    raise FileNotFoundError(f"no weights in {path!r}: expected {wanted}{why}")


def _open_weights(full: str, weights_only: bool = True, mmap: bool = True):
    """({key: (shape, dtype)}, get(key) -> tensor) of one weights file; safetensors reads its header only."""
    try:
        if full.endswith(".safetensors"):
            if mmap:
                from safetensors import safe_open

                f = safe_open(full, framework="pt")
                entries = {}
                for k in f.keys():
                    sl = f.get_slice(k)
                    entries[k] = (tuple(sl.get_shape()), sl.get_dtype())
                return entries, f.get_tensor
            from safetensors.torch import load as load_bytes

            with open(full, "rb") as fh:  # disable_mmap: read the file into memory (network file systems)
                state = load_bytes(fh.read())
        else:
            try:  # mmap: shapes without reading the data (zip-format .bin files, torch >= 1.6)
                if not mmap:
                    raise RuntimeError("mmap off")
                state = torch.load(full, map_location="cpu", weights_only=weights_only, mmap=True)
            except RuntimeError:
                state = torch.load(full, map_location="cpu", weights_only=weights_only)
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise ValueError("not a dict of tensor name -> tensor")
        return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}, state.__getitem__
    except Exception as exc:
        raise ValueError(f"could not read weights file {full!r}: {exc}") from exc


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


class Weights:
    """A checkpoint's tensors by name: ``shapes`` and ``dtypes`` from the files' headers, ``file_of`` the
    file each is read from, :meth:`load` reads one tensor."""

    def __init__(self, path: str | None = None, *, use_safetensors: bool | None = None, variant: str | None = None,
                 weights_only: bool = True, disable_mmap: bool = False):
        self.shapes: dict[str, tuple] = {}
        self.dtypes: dict[str, object] = {}
        self.file_of: dict[str, str] = {}
        self._get: dict[str, object] = {}
        if path is None:
            return
        again = []
        for fn in weight_files(path, use_safetensors=use_safetensors, variant=variant):
            full = os.path.join(path, fn)
            entries, get = _open_weights(full, weights_only=weights_only, mmap=not disable_mmap)
            for k, (shape, dtype) in entries.items():
                if k in self.shapes:
                    again.append((k, get, full))
                    continue
                self._add(k, shape, dtype, get, full)
        self._check_repeats(again)

    @classmethod
    def from_state_dict(cls, state: dict, source: str = "state_dict") -> "Weights":
        """``from_pretrained(None, config=..., state_dict=...)``: tensors given in memory."""
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise TypeError("state_dict must be a dict of tensor name -> torch.Tensor")
        w = cls()
        for k, v in state.items():
            w._add(k, tuple(v.shape), v.dtype, state.__getitem__, source)
        return w

    def _add(self, key, shape, dtype, get, full):
        self.shapes[key], self.dtypes[key], self.file_of[key] = shape, dtype, full
        self._get[key] = get

    def _check_repeats(self, again) -> None:
        """A tensor in two files: the same bytes load (it is one tensor, stored twice); different values
        are refused, since which one was meant cannot be told (transformers silently keeps one)."""
        differ = []
        for key, get, full in again:
            if not _same_bytes(self.load(key), get(key)):
                differ.append(f"{key}: in {self.file_of[key]} and in {full}")
        if differ:
            shown = "\n    ".join(differ[:20]) + (f"\n    ... and {len(differ) - 20} more" if len(differ) > 20 else "")
            raise CheckpointMismatchError(
                f"{len(differ)} tensor(s) stored in two weights files with different values (which one is right "
                f"cannot be told; a sharded checkpoint holds each tensor once):\n    {shown}")

    def load(self, key: str) -> torch.Tensor:
        try:
            return self._get[key](key)
        except Exception as exc:
            raise ValueError(f"could not read tensor {key!r} from weights file {self.file_of[key]!r}: {exc}") from exc


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (safetensors preferred; sharded or single file)."""
    w = Weights(path)
    return {k: w.load(k) for k in w.shapes}
