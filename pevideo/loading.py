"""Reading and writing transformers-format PE Video checkpoints (config.json + safetensors, sharded or not).

Module sizes follow the checkpoint where transformers' config is unreliable (the frame head's width),
missing or mismatched tensors raise one error that lists them, and what pevideo writes loads in
transformers.
"""
from __future__ import annotations

import copy
import json
import os
import re
from collections import Counter

import torch

from .config import config_from_dict, load_config_dict, validate_config_dict
from .dropin import ADAPTER, apply_attn_implementation, take_from_pretrained_kwargs
from .errors import CheckpointConfigError, CheckpointMismatchError, UsageError
from .weights import SAFE_INDEX, Weights, dtype_name, is_float_dtype, read_state_dict

__all__ = ["PretrainedMixin", "CheckpointMismatchError", "read_state_dict", "resolve_checkpoint", "resolve_device",
           "resolve_dtype", "parse_dtype"]

_HEAD_KEY = "embedder.vision_model.timm_model.head.weight"


def resolve_checkpoint(name_or_path: str | os.PathLike, subfolder: str = "", **hub_kwargs) -> str:
    """A local folder as is; otherwise a Hugging Face Hub repo id, downloaded (config and weights only).
    ``subfolder``: the checkpoint lies in that folder of it, as in transformers."""
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        if subfolder:
            sub = os.path.join(path, subfolder)
            if not os.path.isdir(sub):
                raise FileNotFoundError(f"no folder {subfolder!r} in checkpoint {path!r} (subfolder=)")
            return sub
        return path
    if os.path.exists(path):
        raise ValueError(f"{path!r} is a file; from_pretrained takes the checkpoint's folder")
    if path.startswith(("/", ".", "~")) or path.count("/") > 1 or os.sep in path.replace("/", ""):
        raise FileNotFoundError(f"no checkpoint folder at {path!r}")
    patterns = ["*.json", "*.safetensors", "*.bin"]
    try:
        from huggingface_hub import snapshot_download

        snap = snapshot_download(
            path, allow_patterns=[f"{subfolder.strip('/')}/{p}" for p in patterns] if subfolder else patterns,
            **{k: v for k, v in hub_kwargs.items() if v is not None},
        )
    except Exception as exc:
        raise FileNotFoundError(
            f"{path!r} is not a local checkpoint folder, and fetching it from the Hugging Face Hub failed: {exc}"
        ) from exc
    return os.path.join(snap, subfolder) if subfolder else snap


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


def _map_keys(keys: list[tuple[str, str]], kind: str, model_type: str | None):
    """Checkpoint keys (``(name, key as stored)``, names after ``key_mapping``) -> ``{model key: stored
    key}``, the stored keys of towers pevideo doesn't build, and ``(model key, stored key)`` for every
    further tensor mapping to a model key already taken (a tied tensor saved twice: PeAudioVideo's text tower)."""
    strip, other = _layout(kind, model_type)
    mapped, ignored, aliases = {}, [], []
    for key, stored in keys:
        if key.startswith(other):
            ignored.append(stored)
            continue
        new = key
        for p in strip:
            if key.startswith(p):
                new = key[len(p) :]
                break
        if new in mapped:
            aliases.append((new, stored))
        else:
            mapped[new] = stored
    return mapped, sorted(ignored), aliases


def _infer_model_type(keys) -> str:
    """The layout of a checkpoint with no config.json to say it (``config=`` / ``state_dict=`` given)."""
    if any(k.startswith(("video_model.", "audio_video_encoder.")) for k in keys):
        return "pe_audio_video"
    return "pe_video" if any(k.startswith("video_encoder.") for k in keys) else "pe_video_encoder"


def _apply_key_mapping(keys, key_mapping: dict | None) -> list[tuple[str, str]]:
    """transformers' ``key_mapping``: {regex: replacement} applied to checkpoint keys; -> (new name, stored key)."""
    if not key_mapping:
        return [(k, k) for k in keys]
    if not isinstance(key_mapping, dict):
        raise UsageError(f"key_mapping must be a dict of regex -> replacement, got {type(key_mapping).__name__}")
    out = []
    for stored in keys:
        name = stored
        for pattern, repl in key_mapping.items():  # in order, each that matches (as transformers 5.x)
            name = re.sub(pattern, repl, name)
        out.append((name, stored))
    return out


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


def _check_aliases(state: dict, names: dict, aliases: list, weights) -> None:
    """A tensor stored under two names that map to one model tensor (tied) must hold the same values."""
    from .weights import _same_bytes

    differ = [f"{names[k]} and {other}" for k, other in aliases if not _same_bytes(state[k], weights.load(other))]
    if differ:
        raise CheckpointMismatchError("checkpoint tensors that are one tensor of the model (tied) hold different "
                                      "values: " + "; ".join(differ[:10]) + (" ..." if len(differ) > 10 else ""))


def _check_fit(own: dict, ckpt: dict, source: str, not_float: list[str] = ()) -> None:
    """Model tensor shapes ``own`` against checkpoint shapes ``ckpt`` (both name -> shape); raise one
    error listing every missing, unexpected and wrongly shaped tensor, and ``not_float``: tensors stored as
    integers or bools where the model holds float weights (copied in, they would load as garbage).

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
    if missing or unexpected or wrong or not_float:
        raise CheckpointMismatchError(_mismatch_message(source, [
            ("tensor(s) missing from the checkpoint", missing),
            ("tensor(s) not in the model (pevideo refuses tensors it has no place for)", unexpected),
            ("tensor(s) of the wrong shape", wrong),
            ("tensor(s) stored as integers or bools where the model has float weights", sorted(not_float)),
        ]))


def _device_target(device, device_map):
    # transformers' placement strategies put everything on the one GPU when there is one; pevideo always does
    if device is None and device_map in ("balanced", "balanced_low_0", "sequential"):
        return resolve_device("auto")
    return _map_device(device, device_map)


def _read_config(kind: str, owner: str, path: str | None, config, overrides: dict, hub: dict):
    """(config, config.json source for messages, config.json dict or None) from the checkpoint's config.json,
    or from ``config=`` (a config object, or a folder / file / Hub id holding one), with ``overrides``."""
    from transformers import PeVideoConfig, PeVideoEncoderConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        if overrides:  # transformers hands them to the model's __init__, which takes none
            raise TypeError(f"{owner}.from_pretrained() got an unexpected keyword argument {next(iter(overrides))!r}")
        cfg = copy.deepcopy(config)
        if kind == "pe_video_encoder" and isinstance(cfg, PeVideoConfig):
            cfg = cfg.video_config
        want = PeVideoConfig if kind == "pe_video" else PeVideoEncoderConfig
        if not isinstance(cfg, want):
            raise UsageError(f"{owner}.from_pretrained(config=...) takes a {want.__name__}, got {type(config).__name__}")
        on_disk = None
        if path is not None and os.path.isfile(os.path.join(path, "config.json")):
            try:
                on_disk = load_config_dict(path)
            except CheckpointConfigError:
                on_disk = None  # config= stands in for it
        return cfg, "config=", on_disk
    where = path
    if config is not None:
        where = os.fspath(config)
        if not os.path.exists(where):
            where = resolve_checkpoint(where, **hub)
    source = where if os.path.isfile(where) else os.path.join(where, "config.json")
    d = load_config_dict(where)
    validate_config_dict(d, source, kind)
    try:
        built = config_from_dict(d, kind, **overrides)
    except (ValueError, TypeError, KeyError, AttributeError, ZeroDivisionError) as exc:
        raise CheckpointConfigError(f"{source}: {type(exc).__name__}: {exc}") from exc
    if overrides:
        built, unused = built
        if unused:
            raise TypeError(f"{owner}.from_pretrained() got an unexpected keyword argument {next(iter(unused))!r} "
                            "(neither a from_pretrained option nor a config attribute)")
    return built, source, d


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
        config=None,
        state_dict: dict | None = None,
        revision: str | None = None,
        cache_dir: str | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        subfolder: str = "",
        variant: str | None = None,
        use_safetensors: bool | None = None,
        weights_only: bool = True,
        disable_mmap: bool = False,
        key_mapping: dict | None = None,
        attn_implementation=None,
        output_loading_info: bool = False,
        **kwargs,
    ):
        """Load a transformers checkpoint folder (or Hub repo id).

        ``fast``: use the fused kernels (falls back per op, with a warning, where they can't run).
        ``compile``: run the frame encoder's blocks outside attention through ``torch.compile``
        (Inductor fuses bias, residual, LayerNorm and GELU passes; the first forward compiles).
        ``dtype``: "auto" (the checkpoint's), a torch dtype, or "bfloat16"/"float16"/"float32".
        ``device`` / ``device_map``: where to put the model ("auto" = CUDA when available).
        PeAudioVideo checkpoints (e.g. facebook/pe-av-large) load too: their video and text towers.

        transformers' other keywords work as there (``config``, ``state_dict``, ``subfolder``, ``variant``,
        ``use_safetensors``, ``key_mapping``, ``output_loading_info``, the Hub's, config attributes such as
        ``return_dict=False``), or are accepted with a one-time warning where they cannot apply
        (``attn_implementation`` sets the text tower's only; see :mod:`pevideo.dropin` and README).
        """
        owner = cls.__name__
        kind = cls._config_kind
        hub = take_from_pretrained_kwargs(owner, kwargs)
        hub.update(revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only or None)
        path = None
        if pretrained_model_name_or_path is not None:
            if state_dict is not None:
                raise UsageError(f"{owner}.from_pretrained: give a checkpoint or state_dict=, not both")
            path = resolve_checkpoint(pretrained_model_name_or_path, subfolder=subfolder, **hub)
            if os.path.isfile(os.path.join(path, "adapter_config.json")):  # transformers would load base + adapter
                raise UsageError(f"{path}: holds a PEFT adapter (adapter_config.json); {ADAPTER}")
        elif state_dict is None or config is None:
            raise UsageError(f"{owner}.from_pretrained(None, ...) needs both config= and state_dict=")
        config, cfg_source, on_disk = _read_config(kind, owner, path, config, kwargs, hub)
        apply_attn_implementation(config, kind, attn_implementation)
        if state_dict is not None:
            weights = Weights.from_state_dict(state_dict)
        else:  # headers only: nothing is read or built before the checks below
            weights = Weights(path, use_safetensors=use_safetensors, variant=variant, weights_only=weights_only,
                              disable_mmap=disable_mmap)
        source = path or "state_dict"
        model_type = on_disk.get("model_type") if on_disk else _infer_model_type(weights.shapes)
        names, ignored, aliases = _map_keys(_apply_key_mapping(weights.shapes, key_mapping), kind, model_type)
        shapes = {k: weights.shapes[c] for k, c in names.items()}
        head_key = ("video_encoder." if kind == "pe_video" else "") + _HEAD_KEY
        if head_key not in shapes:
            raise CheckpointMismatchError(f"checkpoint {source!r} has no frame-encoder head ({head_key})")
        num_classes = shapes[head_key][0]  # transformers' config can't be trusted for this width
        try:
            _check_depths(config, kind, shapes, source)
            with torch.device("meta"):  # the model's shapes, without allocating it
                skeleton = cls(config, num_classes=num_classes)
        except (CheckpointMismatchError, CheckpointConfigError):
            raise
        except (ValueError, TypeError, KeyError, AttributeError, ZeroDivisionError, ImportError) as exc:
            raise CheckpointConfigError(f"{cfg_source}: cannot build the model it describes: {exc}") from exc
        own = skeleton.state_dict()
        not_float = [f"{k}: {dtype_name(weights.dtypes[names[k]])} in {weights.file_of[names[k]]}"
                     for k, v in own.items() if k in names and v.is_floating_point()
                     and not is_float_dtype(weights.dtypes[names[k]])]
        _check_fit({k: v.shape for k, v in own.items()}, shapes, source, not_float)
        del skeleton, own
        state = {k: weights.load(c) for k, c in names.items()}
        _check_aliases(state, names, aliases, weights)
        model = cls(config, fast=fast, compile=compile, num_classes=num_classes)
        with torch.no_grad():
            for k, t in model.state_dict().items():
                t.copy_(state[k])
        #: checkpoint tensors of upstream towers this model doesn't build (e.g. the audio towers of a
        #: PeAudioVideo checkpoint, or the text tower when loading PeVideoEncoder); any other tensor the
        #: model has no place for raises CheckpointMismatchError.
        model.ignored_checkpoint_keys = ignored
        model.name_or_path = path  # where the processor and tokenizer of this model are
        if torch_dtype is not None and dtype in (None, "auto"):  # transformers: dtype first, torch_dtype for BC
            dtype = torch_dtype
        target_dtype = resolve_dtype(dtype, stored=_stored_dtype(state))
        del state
        model.to(device=_device_target(device, device_map), dtype=target_dtype)
        model.eval()
        if output_loading_info:  # strict loading: nothing missing or mismatched ever gets this far
            return model, {"missing_keys": set(), "unexpected_keys": set(ignored), "mismatched_keys": set(),
                           "error_msgs": []}
        return model

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
            if fn.startswith("model") and (fn.endswith(".safetensors") or fn == SAFE_INDEX):
                os.remove(os.path.join(out, fn))
        for fn, keys in split.filename_to_tensors.items():
            save_file({k: state[k] for k in keys}, os.path.join(out, fn), metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                     "weight_map": split.tensor_to_filename}
            with open(os.path.join(out, SAFE_INDEX), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2, sort_keys=True)
