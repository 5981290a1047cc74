"""Where a processor comes from: transformers' processor config files, the frame size a checkpoint's
config.json gives (for checkpoints written without processor files), and the checkpoint's tokenizer."""
from __future__ import annotations

import json
import os

from .config import read_checkpoint_config, vit_args

__all__ = ["checkpoint_frame_size", "load_tokenizer", "load_video_config", "NoProcessorConfig"]

VIDEO_PROCESSOR_NAME = "video_preprocessor_config.json"
PROCESSOR_NAME = "processor_config.json"
IMAGE_PROCESSOR_NAME = "preprocessor_config.json"


class NoProcessorConfig(OSError):
    """None of the files transformers reads a video processor from is there."""


def checkpoint_frame_size(path) -> tuple[int, int] | None:
    """The frame size (h, w) a local checkpoint folder's ``config.json`` gives its frame encoder, without
    loading the model; None when ``path`` is not a local folder with a config.json."""
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        return None
    d = read_checkpoint_config(path, "pe_video_encoder")
    return tuple(vit_args(d.get("vision_config") or {}).img_size)


def load_tokenizer(path, **kwargs):
    """The checkpoint's text tokenizer (``AutoTokenizer``); a ValueError saying what is missing and where
    a tokenizer comes from when there is none (``model.save_pretrained`` writes no tokenizer)."""
    from transformers import AutoTokenizer

    path = os.fspath(path)
    hint = ("PE Video's text side needs the tokenizer of the checkpoint the weights come from: write it "
            "next to the checkpoint with AutoTokenizer.from_pretrained(<that checkpoint or Hub id>)"
            ".save_pretrained(path) (see README: Your own or an offline checkpoint)")
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, n)) for n in names):
        raise ValueError(f"{path} has no tokenizer ({' / '.join(names[:2])}); {hint}")
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load a tokenizer from {path}: {exc}; {hint}") from exc


def load_video_config(path, **hub) -> dict:
    """The video processor's settings, found where transformers looks for them."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return _read_json(path)
    if os.path.isdir(path):
        sub = hub.get("subfolder") or ""

        def found(name):
            p = os.path.join(path, sub, name)
            return p if os.path.isfile(p) else None

    else:
        from transformers.utils import cached_file

        def found(name):
            return cached_file(path, name, _raise_exceptions_for_missing_entries=False, **hub)

    proc = found(PROCESSOR_NAME)
    if proc is not None:
        d = _read_json(proc)
        if isinstance(d.get("video_processor"), dict):
            return dict(d["video_processor"])
    for name in (VIDEO_PROCESSOR_NAME, IMAGE_PROCESSOR_NAME):
        p = found(name)
        if p is not None:
            return _read_json(p)
    raise NoProcessorConfig(
        f"no video processor config in {path!r}: looked for {PROCESSOR_NAME} (with a 'video_processor' "
        f"entry), {VIDEO_PROCESSOR_NAME} and {IMAGE_PROCESSOR_NAME}"
    )


def _read_json(path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise OSError(f"cannot read processor config {path}: {exc}") from exc
    if not isinstance(d, dict):
        raise OSError(f"processor config {path} is not a JSON object")
    return d
