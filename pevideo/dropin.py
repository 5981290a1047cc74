"""transformers' keyword arguments on pevideo's models, so that code written for transformers' PeVideoModel
runs unchanged.

Each keyword of transformers' ``from_pretrained`` and of ``PeVideoModel.forward`` / ``get_video_features`` /
``get_text_features`` / ``PeVideoEncoder.forward`` (5.17 to 5.25) either works as in transformers, or is
accepted with a one-time :class:`PeVideoCompatibilityWarning` saying why it cannot apply, or (where
ignoring it would load different weights) raises a clear error. Keywords transformers does not know
raise TypeError. README.md, "Differences from transformers", lists them.
"""
from __future__ import annotations

import warnings

import torch

from .errors import UsageError

__all__ = ["PeVideoCompatibilityWarning", "take_from_pretrained_kwargs", "apply_attn_implementation",
           "OutputOptions", "check_forward_kwargs", "text_tower_kwargs", "attention_probs"]


class PeVideoCompatibilityWarning(UserWarning):
    """A transformers keyword argument that cannot apply to pevideo was accepted and has no effect."""


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Warn once per process and ``key``."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, PeVideoCompatibilityWarning, stacklevel=4)


# --------------------------------------------------------------------------------------------------
# from_pretrained
# --------------------------------------------------------------------------------------------------
# transformers pops these and does nothing with them for PE Video (some it ignores altogether since
# 5.0): accepted silently, the same as there.
NO_EFFECT = frozenset({
    "low_cpu_mem_usage", "mirror", "_fast_init", "from_tf", "from_flax", "offload_state_dict", "_from_auto",
    "_from_pipeline", "_commit_hash", "trust_remote_code", "generation_config", "experts_implementation",
    "adapter_name", "adapter_kwargs",  # (an adapter folder itself is refused: see loading)
})
# Passed on to the Hub download, as transformers does.
HUB = frozenset({"force_download", "proxies", "tqdm_class"})

_ONE_DEVICE = "pevideo places the whole model on one device (no offloading, no split across devices)"
_OWN_KERNELS = "pevideo runs its own kernels (fast=True) and fusions (compile=True), not kernels from the Hub"
_NO_TP = ("pevideo runs the whole model on one device per process (no tensor parallelism); to use several GPUs "
          "run data-parallel: torchrun -m pevideo embed")
# Cannot apply to pevideo: accepted, with a one-time warning when given a value other than transformers'
# default (which is what pevideo does anyway).
NOT_APPLICABLE = {
    "max_memory": _ONE_DEVICE, "offload_folder": _ONE_DEVICE, "offload_buffers": _ONE_DEVICE,
    "use_kernels": _OWN_KERNELS, "kernel_config": _OWN_KERNELS, "kernels_mode": _OWN_KERNELS,
    "allow_all_kernels": _OWN_KERNELS, "fusion_config": _OWN_KERNELS,
    "distributed_config": _NO_TP, "device_mesh": _NO_TP, "tp_plan": _NO_TP, "tp_size": _NO_TP,
    "quantization_config": "pevideo does not quantize: the weights load as stored, in the dtype asked for",
    "ignore_mismatched_sizes": ("pevideo never re-initializes a tensor whose shape differs from the checkpoint's "
                                "(the outputs would be random): a mismatch still raises CheckpointMismatchError"),
}
# Ignoring these would load other weights than the caller asked for: refused.
REFUSED = {
    "gguf_file": "pevideo reads safetensors and PyTorch .bin checkpoints, not GGUF files",
}
ADAPTER = "pevideo does not load PEFT adapters (merge the adapter into the weights, save_pretrained, load that)"


def _is_default(v) -> bool:
    return v is None or v is False or (isinstance(v, (dict, list, tuple)) and not v)


def take_from_pretrained_kwargs(owner: str, kwargs: dict) -> dict:
    """Pop transformers' ``from_pretrained`` keywords that pevideo does not take as parameters from
    ``kwargs``: warn about (or refuse) those that cannot apply, return those for the Hub download.
    What is left in ``kwargs`` is for the config (``return_dict=False``, ...), as in transformers."""
    hub = {}
    for key in list(kwargs):
        if key in NO_EFFECT:
            kwargs.pop(key)
        elif key in HUB:
            hub[key] = kwargs.pop(key)
        elif key in NOT_APPLICABLE:
            if not _is_default(kwargs.pop(key)):
                warn_once(f"from_pretrained:{key}", f"{owner}.from_pretrained({key}=...) has no effect: {NOT_APPLICABLE[key]}")
        elif key in REFUSED:
            if not _is_default(kwargs.pop(key)):
                raise UsageError(f"{owner}.from_pretrained({key}=...): {REFUSED[key]}")
    return hub


def apply_attn_implementation(config, kind: str, value) -> None:
    """``attn_implementation``: the text tower is transformers' own ModernBERT, so it takes it (a str,
    or transformers' dict form {"text_config": ...}); the video tower always runs pevideo's attention."""
    if value is None:
        return
    video_note = ("pevideo's video tower chooses its own attention (fused Triton kernels with fast=True, PyTorch's "
                  "SDPA reference otherwise; output_attentions returns its temporal attention probabilities either way)")
    if kind != "pe_video":
        warn_once("attn_implementation:encoder", f"attn_implementation={value!r} has no effect: {video_note}")
        return
    text = value.get("text_config") if isinstance(value, dict) else value
    if text is not None:
        config.text_config._attn_implementation = text
    warn_once("attn_implementation", f"attn_implementation={value!r} applies to the text tower (transformers' "
                                     f"ModernBERT) only: {video_note}")


# --------------------------------------------------------------------------------------------------
# forward / get_video_features / get_text_features
# --------------------------------------------------------------------------------------------------
def _hidden_state_mode() -> str:
    """How the installed transformers reads an ``output_hidden_states`` that is not a bool: "select" (5.2x:
    an index or indices into all the hidden states, negative ones from the end), "layers" (5.17: a list of
    layer indices, one entry per layer output and no initial state), or "flag" (any truthy value = all)."""
    try:
        from transformers.utils import output_capturing
    except ImportError:
        return "flag"
    if hasattr(output_capturing, "selected_hidden_states"):
        return "select"
    import inspect

    try:
        return "layers" if "_hidden_states_layers" in inspect.getsource(output_capturing) else "flag"
    except (OSError, TypeError):
        return "flag"


HIDDEN_STATE_MODE = _hidden_state_mode()
SELECTION = HIDDEN_STATE_MODE == "select"  # forward asks the text tower for its last hidden state only (-1)


# TransformersKwargs that do nothing in upstream's PE Video (SDPA attention) either: accepted silently.
_FORWARD_NO_EFFECT = frozenset({"num_items_in_batch", "output_router_logits", "is_causal"})
# FlashAttention's packing arguments: pevideo packs the frames itself.
_FORWARD_FLASH = frozenset({"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx"})


def check_forward_kwargs(owner: str, kwargs: dict) -> dict:
    """Check a forward's ``**kwargs`` (transformers' TransformersKwargs beyond the named ones); return those
    for the text tower (``position_ids``). Unknown keywords raise TypeError, as Python would."""
    text = {}
    for key, value in kwargs.items():
        if key == "position_ids":
            text[key] = value
        elif key in _FORWARD_FLASH:
            warn_once(f"forward:{key}", f"{owner}({key}=...) has no effect: FlashAttention packing arguments; "
                                        "pevideo packs the frames of a batch itself")
        elif key not in _FORWARD_NO_EFFECT:
            raise TypeError(f"{owner}() got an unexpected keyword argument {key!r}")
    return text


class OutputOptions:
    """``output_hidden_states`` / ``output_attentions`` for the video tower, defaults from its config as in
    transformers, and the hidden states it keeps: transformers' layout, (input of layer 0, output of
    layer 0, ..., output of layer N-2, last_hidden_state). Indices select as the installed transformers
    does (see :func:`_hidden_state_mode`); states not selected are None."""

    def __init__(self, config, num_layers: int, output_hidden_states=None, output_attentions: bool | None = None):
        ohs = getattr(config, "output_hidden_states", False) if output_hidden_states is None else output_hidden_states
        oa = getattr(config, "output_attentions", False) if output_attentions is None else output_attentions
        self.attentions: list | None = [] if oa else None
        self.hidden_states: list | None = [] if ohs else None  # 0 or [] ask for nothing, as in transformers
        self._keep = None
        self._skip_initial = False
        if ohs and not isinstance(ohs, bool):
            if HIDDEN_STATE_MODE == "select":
                n = num_layers + 1
                idx = [ohs] if isinstance(ohs, int) else list(ohs)
                self._keep = {i % n for i in idx if -n <= i < n}
            elif HIDDEN_STATE_MODE == "layers" and isinstance(ohs, (list, tuple, set)):
                self._keep, self._skip_initial = set(ohs), True  # layer outputs only, indices as given
        self._layers = num_layers

    def layer_input(self, x: torch.Tensor) -> None:
        if self.hidden_states is not None:
            if self._skip_initial:
                self._skip_initial = False
                return
            self._add(x)

    def finish(self, out, last_hidden_state: torch.Tensor):
        """Put what was kept on ``out`` (a BaseModelOutputWithPooling), as transformers does."""
        if self.hidden_states is not None:
            if self._layers:
                self._add(last_hidden_state)  # transformers ties the last one to last_hidden_state
            out.hidden_states = tuple(self.hidden_states)
        if self.attentions is not None:
            out.attentions = tuple(self.attentions)
        return out

    def _add(self, x):
        i = len(self.hidden_states)
        self.hidden_states.append(x if self._keep is None or i in self._keep else None)


def text_tower_kwargs(output_hidden_states, output_attentions, extra: dict, in_forward: bool) -> dict:
    """What transformers' PeVideoModel passes to its text model: the caller's keywords, and in ``forward``
    always ``output_hidden_states`` (it reads the last one): True before 5.2x, -1 (the last only) after."""
    kw = dict(extra)
    if in_forward:
        kw["output_hidden_states"] = (output_hidden_states or -1) if SELECTION else True
    elif output_hidden_states is not None:
        kw["output_hidden_states"] = output_hidden_states
    if output_attentions is not None:
        kw["output_attentions"] = output_attentions
    return kw


def attention_probs(q, k, coords, freqs, mask, scale: float | None = None) -> torch.Tensor:
    """Temporal attention probabilities as transformers' eager attention returns them: (batch, heads, S, S),
    softmax in float32 over the real keys, in q's dtype. ``q`` (B, S, H, D), ``k`` (B, S, Hkv, D) before RoPE.
    Computed apart from the attention op (which, fused, never forms them); S = frames + 1 is small."""
    from pevideo_kernels import apply_rope_ref

    q = apply_rope_ref(q, coords, freqs)
    k = apply_rope_ref(k, coords, freqs)
    if k.shape[2] != q.shape[2]:
        k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1).to(q.dtype)
