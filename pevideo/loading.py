"""Reading and writing transformers-format PE Video checkpoints (config.json + safetensors, sharded or not).

Module sizes follow the checkpoint where transformers' config is unreliable (the frame head's width),
missing or mismatched tensors raise one error that lists them, and what pevideo writes loads in
transformers.
"""
from __future__ import annotations

import copy
import json
import os
from collections import Counter

import torch

from .config import config_from_dict, load_config_dict

__all__ = ["PretrainedMixin", "CheckpointMismatchError", "read_state_dict", "resolve_checkpoint", "resolve_device",
           "resolve_dtype", "parse_dtype"]

_HEAD_KEY = "embedder.vision_model.timm_model.head.weight"
_SAFE_INDEX = "model.safetensors.index.json"
_BIN_INDEX = "pytorch_model.bin.index.json"


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors don't fit the model its config describes."""


def resolve_checkpoint(name_or_path: str | os.PathLike, **hub_kwargs) -> str:
    """A local folder as is; otherwise a Hugging Face Hub repo id, downloaded (config and weights only)."""
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"{path!r} is a file; from_pretrained takes the checkpoint's folder")
    if path.startswith(("/", ".", "~")) or path.count("/") > 1 or os.sep in path.replace("/", ""):
        raise FileNotFoundError(f"no checkpoint folder at {path!r}")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            path, allow_patterns=["*.json", "*.safetensors", "*.bin"], **{k: v for k, v in hub_kwargs.items() if v is not None}
        )
    except Exception as exc:
        raise FileNotFoundError(
            f"{path!r} is not a local checkpoint folder, and fetching it from the Hugging Face Hub failed: {exc}"
        ) from exc


def _weight_files(path: str) -> list[str]:
    """The checkpoint's weight files (safetensors preferred; sharded or single file)."""

    def _index(name):
        with open(os.path.join(path, name), encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        missing = [x for x in files if not os.path.isfile(os.path.join(path, x))]
        if missing:
            raise FileNotFoundError(f"checkpoint {path!r} is missing shard file(s) {missing} listed in {name}")
        return files

    if os.path.isfile(os.path.join(path, _SAFE_INDEX)):
        return _index(_SAFE_INDEX)
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return ["model.safetensors"]
    if os.path.isfile(os.path.join(path, _BIN_INDEX)):
        return _index(_BIN_INDEX)
    if os.path.isfile(os.path.join(path, "pytorch_model.bin")):
        return ["pytorch_model.bin"]
    raise FileNotFoundError(f"no weights in {path!r} (expected model.safetensors or a sharded index)")


def _open_weights(full: str):
    """(key -> shape, get(key) -> tensor) of one weights file; safetensors reads only its header here."""
    try:
        if full.endswith(".safetensors"):
            from safetensors import safe_open

            f = safe_open(full, framework="pt")
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.get_tensor
        try:  # mmap: shapes without reading the data (zip-format .bin files, torch >= 1.6)
            state = torch.load(full, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            state = torch.load(full, map_location="cpu", weights_only=True)
        return {k: tuple(v.shape) for k, v in state.items()}, state.__getitem__
    except Exception as exc:
        raise ValueError(f"could not read weights file {full!r}: {exc}") from exc


class _Weights:
    """A checkpoint's tensors by name: shapes from the files' headers, tensors read on demand."""

    def __init__(self, path: str):
        self.shapes: dict[str, tuple] = {}
        self._get: dict[str, object] = {}
        for fn in _weight_files(path):
            full = os.path.join(path, fn)
            shapes, get = _open_weights(full)
            for k, shape in shapes.items():
                self.shapes.setdefault(k, shape)
                self._get.setdefault(k, (get, full))

    def load(self, key: str) -> torch.Tensor:
        get, full = self._get[key]
        try:
            return get(key)
        except Exception as exc:
            raise ValueError(f"could not read tensor {key!r} from weights file {full!r}: {exc}") from exc


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (safetensors preferred; sharded or single file)."""
    w = _Weights(path)
    return {k: w.load(k) for k in w.shapes}


# Tensors of upstream towers that pevideo doesn't build, by the checkpoint's model_type and the model
# loaded. They are skipped and listed in ``model.ignored_checkpoint_keys``; any other tensor the model
# doesn't use raises (see _check_fit).
_AV_ONLY = (
    "audio_model.", "audio_video_encoder.", "audio_video_head.", "text_audio_video_head.", "audio_plus_text_head.",
    "video_plus_text_head.", "audio_video_logit_", "text_audio_video_logit_", "audio_plus_text_logit_",
    "video_plus_text_logit_",
)
_TEXT_SIDE = ("text_model.", "text_video_head.", "video_head.", "text_video_logit_")


def _layout(kind: str, model_type: str | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(prefixes to strip from checkpoint keys, prefixes of towers not built) for loading ``kind``."""
    av = model_type == "pe_audio_video"
    if kind == "pe_video":
        return (("video_model.",), _AV_ONLY) if av else ((), ())
    if av:  # the video tower of a PeAudioVideo checkpoint
        return ("video_model.video_encoder.",), _AV_ONLY + _TEXT_SIDE + tuple("video_model." + p for p in _TEXT_SIDE)
    if model_type == "pe_video":
        return ("video_encoder.",), _TEXT_SIDE
    return (), ()


def _map_keys(keys, kind: str, model_type: str | None) -> tuple[dict[str, str], list[str]]:
    """Checkpoint keys -> {model key: checkpoint key}, and the keys of towers pevideo doesn't build."""
    strip, other = _layout(kind, model_type)
    mapped, ignored = {}, []
    for key in keys:
        if key.startswith(other):
            ignored.append(key)
            continue
        new = key
        for p in strip:
            if key.startswith(p):
                new = key[len(p) :]
                break
        mapped.setdefault(new, key)  # a tied tensor saved twice (PeAudioVideo's text tower) maps once
    return mapped, sorted(ignored)


def _stored_dtype(state: dict) -> torch.dtype:
    counts = Counter(v.dtype for v in state.values() if v.is_floating_point())
    return counts.most_common(1)[0][0] if counts else torch.float32


DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
               "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype) -> torch.dtype:
    """A torch dtype, or one of its names in ``DTYPE_NAMES`` ("bf16", "float32", ...), as a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) in DTYPE_NAMES:
        return DTYPE_NAMES[str(dtype)]
    raise ValueError(f"dtype must be 'auto', a torch dtype or one of {sorted(DTYPE_NAMES)}, got {dtype!r}")


def resolve_dtype(dtype, device: torch.device | None = None, stored: torch.dtype | None = None) -> torch.dtype:
    """The one reading of a ``dtype`` argument: a torch dtype or a name in ``DTYPE_NAMES`` as such.
    None or "auto": ``stored`` when given (``from_pretrained``: the checkpoint's own dtype, as in
    transformers), else the pipeline's choice for ``device``: bfloat16 on a GPU, float32 on CPU."""
    if dtype is None or dtype == "auto":
        if stored is not None:
            return stored
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    return parse_dtype(dtype)


def resolve_device(device, default=None) -> torch.device | None:
    """The one reading of a ``device`` argument. "auto": CUDA when available, else CPU; None: ``default``
    (``from_pretrained``: None, the model stays where it is built, on CPU; the pipeline: "auto"); an int:
    that CUDA device; anything else as ``torch.device`` reads it. A name torch does not know, or CUDA
    where there is none, raises ValueError."""
    if device is None:
        device = default
    if device is None:
        return None
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device("cuda", device) if isinstance(device, int) and not isinstance(device, bool) else torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"not a device: {device!r} (give cpu, cuda, cuda:N or auto): {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    return dev


def _map_device(device, device_map):
    """from_pretrained's ``device``, or a ``device_map`` that names one device for everything."""
    target = device if device is not None else device_map
    if isinstance(target, dict):
        devices = set(target.values())
        if len(devices) != 1:
            raise ValueError("pevideo places the whole model on one device; give device='cuda:0' (or device_map='auto')")
        target = devices.pop()
    return resolve_device(target)


def _mismatch_message(source: str, sections) -> str:
    parts = []
    for title, items in sections:
        if items:
            shown = "\n    ".join(items[:20]) + (f"\n    ... and {len(items) - 20} more" if len(items) > 20 else "")
            parts.append(f"  {len(items)} {title}:\n    {shown}")
    return f"checkpoint {source!r} does not match the model its config.json describes:\n" + "\n".join(parts)


def _indices(shapes, prefix: str) -> set[int]:
    """The numbers i of the ``prefix{i}.`` module lists among the checkpoint's keys."""
    out = set()
    for k in shapes:
        if k.startswith(prefix):
            head = k[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                out.add(int(head))
    return out


def _check_depths(config, kind: str, shapes: dict, source: str) -> None:
    """Layer counts of config.json against the checkpoint's, before anything is built (a config that says
    10000 layers must fail in milliseconds, not after allocating them)."""
    from .config import vit_args

    enc = config.video_config if kind == "pe_video" else config
    pre = "video_encoder." if kind == "pe_video" else ""
    counts = [
        ("frame-encoder blocks (vision_config depth)", vit_args(enc.vision_config).depth,
         pre + "embedder.vision_model.timm_model.blocks."),
        ("temporal layers (num_hidden_layers)", enc.num_hidden_layers, pre + "layers."),
    ]
    if kind == "pe_video":
        counts.append(("text layers (text_config num_hidden_layers)", config.text_config.num_hidden_layers,
                       "text_model.layers."))
    bad = []
    for what, want, prefix in counts:
        have = _indices(shapes, prefix)
        n = max(have) + 1 if have else 0
        # More layers than the checkpoint has: fail now. Fewer (or holes) cost nothing to build on the
        # meta device, and _check_fit then lists the tensors one by one.
        if want > n:
            bad.append(f"config.json says {want} {what}, the checkpoint has {n}")
    if bad:
        raise CheckpointMismatchError(_mismatch_message(source, [("layer count(s) differ", bad)]))


def _check_fit(own: dict, ckpt: dict, source: str) -> None:
    """Model tensor shapes ``own`` against checkpoint shapes ``ckpt`` (both name -> shape); raise one
    error listing every missing, unexpected and wrongly shaped tensor.

    Unexpected tensors raise rather than being ignored (transformers warns and goes on): a tensor the
    model has no place for means the checkpoint is not the architecture config.json describes (a newer
    or modified model, a wrong merge), and the embeddings computed without it would be silently wrong.
    Tensors of upstream towers pevideo doesn't build are not unexpected; they never reach here
    (``_map_keys``) and are listed in ``model.ignored_checkpoint_keys``.
    """
    missing = sorted(k for k in own if k not in ckpt)
    unexpected = sorted(k for k in ckpt if k not in own)
    wrong = sorted(f"{k}: checkpoint {tuple(ckpt[k])} vs model {tuple(own[k])}"
                   for k in own if k in ckpt and tuple(ckpt[k]) != tuple(own[k]))
    if missing or unexpected or wrong:
        raise CheckpointMismatchError(_mismatch_message(source, [
            ("tensor(s) missing from the checkpoint", missing),
            ("tensor(s) not in the model (pevideo refuses tensors it has no place for)", unexpected),
            ("tensor(s) of the wrong shape", wrong),
        ]))


class PretrainedMixin:
    """``from_pretrained`` / ``save_pretrained`` in transformers' folder format."""

    _config_kind: str

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        fast: bool = False,
        *,
        compile: bool = False,
        dtype="auto",
        torch_dtype=None,
        device=None,
        device_map=None,
        revision: str | None = None,
        cache_dir: str | None = None,
        token: str | None = None,
        local_files_only: bool = False,
    ):
        """Load a transformers checkpoint folder (or Hub repo id).

        ``fast``: use the fused kernels (falls back per op, with a warning, where they can't run).
        ``compile``: run the frame encoder's blocks outside attention through ``torch.compile``
        (Inductor fuses bias, residual, LayerNorm and GELU passes; the first forward compiles).
        ``dtype``: "auto" (the checkpoint's), a torch dtype, or "bfloat16"/"float16"/"float32".
        ``device`` / ``device_map``: where to put the model ("auto" = CUDA when available).
        PeAudioVideo checkpoints (e.g. facebook/pe-av-large) load too: their video and text towers.
        """
        path = resolve_checkpoint(
            pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir, token=token,
            local_files_only=local_files_only or None,
        )
        config_dict = load_config_dict(path)
        config = config_from_dict(config_dict, cls._config_kind)
        weights = _Weights(path)  # headers only: nothing is read or built before the checks below
        names, ignored = _map_keys(weights.shapes, cls._config_kind, config_dict.get("model_type"))
        shapes = {k: weights.shapes[c] for k, c in names.items()}
        head_key = ("video_encoder." if cls._config_kind == "pe_video" else "") + _HEAD_KEY
        if head_key not in shapes:
            raise CheckpointMismatchError(f"checkpoint {path!r} has no frame-encoder head ({head_key})")
        num_classes = shapes[head_key][0]  # transformers' config can't be trusted for this width
        _check_depths(config, cls._config_kind, shapes, path)
        with torch.device("meta"):  # the model's shapes, without allocating it
            skeleton = cls(config, num_classes=num_classes)
        _check_fit({k: v.shape for k, v in skeleton.state_dict().items()}, shapes, path)
        del skeleton
        state = {k: weights.load(c) for k, c in names.items()}
        model = cls(config, fast=fast, compile=compile, num_classes=num_classes)
        with torch.no_grad():
            for k, t in model.state_dict().items():
                t.copy_(state[k])
        #: checkpoint tensors of upstream towers this model doesn't build (e.g. the audio towers of a
        #: PeAudioVideo checkpoint, or the text tower when loading PeVideoEncoder); any other tensor the
        #: model has no place for raises CheckpointMismatchError.
        model.ignored_checkpoint_keys = ignored
        model.name_or_path = path  # where the processor and tokenizer of this model are
        target_dtype = resolve_dtype(torch_dtype if torch_dtype is not None else dtype, stored=_stored_dtype(state))
        del state
        model.to(device=_map_device(device, device_map), dtype=target_dtype)
        return model.eval()

    def _export_config(self) -> dict:
        cfg = copy.deepcopy(self.config)
        enc = cfg.video_config if self._config_kind == "pe_video" else cfg
        width = self.video_encoder.vit.args.num_classes if self._config_kind == "pe_video" else self.vit.args.num_classes
        enc.vision_config.num_labels = width  # id2label of the head's width
        d = cfg.to_dict()
        vc = (d["video_config"] if self._config_kind == "pe_video" else d)["vision_config"]
        # transformers sizes the head from num_labels when it rebuilds the nested config; keep all three in step.
        vc["num_labels"] = width
        vc["num_classes"] = width
        vc["label_names"] = [f"LABEL_{i}" for i in range(width)]
        d["architectures"] = ["PeVideoModel" if self._config_kind == "pe_video" else "PeVideoEncoder"]
        d["dtype"] = str(self.dtype).replace("torch.", "")
        return d

    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
        """Write config.json and safetensors weights (sharded above ``max_shard_size``) loadable by transformers."""
        from huggingface_hub import split_torch_state_dict_into_shards
        from safetensors.torch import save_file

        out = os.fspath(save_directory)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self._export_config(), f, indent=2, sort_keys=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
        for fn in os.listdir(out):  # stale shards of an earlier save would confuse the index
            if fn.startswith("model") and (fn.endswith(".safetensors") or fn == _SAFE_INDEX):
                os.remove(os.path.join(out, fn))
        for fn, keys in split.filename_to_tensors.items():
            save_file({k: state[k] for k in keys}, os.path.join(out, fn), metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                     "weight_map": split.tensor_to_filename}
            with open(os.path.join(out, _SAFE_INDEX), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2, sort_keys=True)
