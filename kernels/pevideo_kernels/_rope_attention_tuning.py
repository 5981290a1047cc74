"""Which tiles rope_attention's kernels launch with on CUDA: the forward's autotuning config sets, the
backward's fixed tiles, and autotuned launches that a warm-up cannot lock in and CUDA-graph capture
never triggers.

Every config here is compiled for sm_90 by ``tests/_build_for_gpu.py`` (registers, spills, shared
memory, exp2 per score); kernels/README.md has the numbers and why each set looks as it does.
"""
from __future__ import annotations

import inspect

import torch
import triton

from ._rope_attention_triton import rope_attn_fwd

__all__ = ["CONFIG_SETS", "TUNING_KEY", "config_set", "tuning_key", "TunedLaunch", "FWD_LAUNCH", "bwd_configs",
           "capturing", "tracing"]

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per class of problem, picked on the host (no prune hook,
# which torch.compile's handling of user kernels may not honour). The first config of a set is its
# default: what a launch uses when it may not tune (under CUDA-graph capture, before any tuning).
CONFIG_SETS = {
    # one or a few queries per row (attention pooling; short temporal clips)
    "q16": [(16, 64, 4, 3), (16, 128, 4, 3), (16, 32, 4, 3), (16, 64, 8, 3)],
    "q32": [(32, 32, 4, 3), (16, 32, 4, 3), (64, 32, 8, 3)],
    # the frame shape (head_dim 64, long segments) rotating K in the loop or from the cos/sin table
    "d64": [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3)],
    # ... and with K prerotated (its default): a plain cp.async -> wgmma loop; every config here fits
    # 2 CTAs per SM on Hopper (<= 128 registers per thread at 8 warps, <= 113 KB shared memory)
    "d64_prerotate": [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 8, 3)],
    # head_dim 96/128: the K tile's rotation temporaries (4 fp32 (BLOCK_N, head_dim/2) arrays)
    # dominate registers, so narrow K tiles and 8 warps
    "d128": [(128, 32, 8, 3), (64, 32, 8, 3), (64, 32, 4, 3), (64, 64, 8, 3)],
    "d256": [(64, 32, 8, 2), (64, 16, 8, 2), (64, 16, 4, 2), (32, 16, 8, 2)],
    # float32 inputs use full-precision (non tensor-core) dots: small tiles only
    "f32": [(32, 16, 4, 2), (16, 32, 4, 2), (16, 16, 4, 2), (64, 16, 8, 2)],
}
# What changes the best config: the head size, the per-segment lengths (bucketed to powers of two, so
# that 577-token frames share one tuning), the batch (segments or rows, bucketed: a 1-clip warm-up must
# not choose tiles for 256 frames), the mode and the flags that change the loop. Input dtypes are added
# (by Triton's autotuner, and by ``tuning_key``).
TUNING_KEY = ["HEAD_DIM", "bucket_q", "bucket_k", "bucket_b", "HAS_ROPE", "IS_PACKED", "HAS_MASK", "ROPE_K"]
MAX_BATCH_BUCKET = 64  # past 64 segments x heads x query blocks, every GPU runs many waves: one tuning


def config_set(bucket_q: int, block_d: int, fp32: bool, rope_k: str = "loop") -> str:
    """Which of CONFIG_SETS a forward launch autotunes over."""
    if fp32:
        return "f32"
    if bucket_q <= 16:
        return "q16"
    if bucket_q <= 32:
        return "q32"
    if block_d <= 64:
        return "d64_prerotate" if rope_k == "prerotate" else "d64"
    return "d128" if block_d <= 128 else "d256"


def batch_bucket(nbatch: int) -> int:
    """The batch-size bucket of the autotuning key: the next power of two, at most MAX_BATCH_BUCKET."""
    return min(1 << max(0, (int(nbatch) - 1).bit_length()), MAX_BATCH_BUCKET)


def _param_names(kernel) -> list:
    return list(inspect.signature(getattr(kernel, "fn", kernel)).parameters)


_FWD_PARAMS = _param_names(rope_attn_fwd)


def tuning_key(set_name: str, args: tuple, flags: dict, dtype) -> tuple:
    """The explicit key of a forward launch: its config set, TUNING_KEY's values and the input dtype."""
    named = {**dict(zip(_FWD_PARAMS, args)), **flags}
    return (set_name, *(named[k] for k in TUNING_KEY), str(dtype))


def capturing(t: torch.Tensor) -> bool:
    """Whether launches on ``t``'s device are being captured into a CUDA graph."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def tracing(t: torch.Tensor) -> bool:
    """Whether this launch is being traced (torch.compile: fake tensors), not run."""
    from torch._subclasses.fake_tensor import is_fake

    return torch.compiler.is_compiling() or is_fake(t)


def _launch_kwargs(cfg) -> dict:
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


class TunedLaunch:
    """Autotuned launches of ``kernel`` over one config set, keyed by :func:`tuning_key`.

    The first launch of a key (outside capture) runs Triton's autotuner -- which benchmarks, or reads
    an earlier run's result from its disk cache -- and remembers the config it chose for that key; later
    launches of the key use it directly. A launch during CUDA-graph capture never tunes (benchmarking
    syncs, which capture forbids): it uses the remembered config, else the set's default, and remembers
    nothing, so a later launch outside capture still tunes. ``wrap`` is ``torch.library.wrap_triton``
    (what lets torch.compile trace a launch; tests pass fakes).
    """

    def __init__(self, kernel, configs, key_names, wrap=None, make_tuner=None):
        self.kernel = kernel
        self.configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                        for bm, bn, w, s in configs]
        self.key_names = key_names
        self.chosen: dict = {}
        self._wrap = wrap or torch.library.wrap_triton
        self._make_tuner = make_tuner or (lambda: triton.autotune(
            configs=self.configs, key=self.key_names,
            # Tuned configs persist in Triton's cache dir, keyed by kernel source, key values and configs:
            # a new process does not benchmark again.
            cache_results=True,
        )(self.kernel))
        self._tuner = None

    @property
    def tuner(self):
        if self._tuner is None:
            self._tuner = self._make_tuner()
        return self._tuner

    def __call__(self, grid, args, flags, key, *, capturing: bool, tracing: bool):
        """Launch; returns the config used, or None where the autotuner chose (and was not yet read)."""
        cfg = self.chosen.get(key)
        if cfg is None and capturing:
            cfg = self.configs[0]
        if cfg is not None:
            self._wrap(self.kernel)[grid](*args, **flags, **_launch_kwargs(cfg))
            return cfg
        tuner = self.tuner
        self._wrap(tuner)[grid](*args, **flags)
        if not tracing:  # (traced: torch.compile's Inductor tunes the launch itself)
            self.chosen[key] = tuner.best_config
            return tuner.best_config
        return None


FWD_LAUNCH = {name: TunedLaunch(rope_attn_fwd, configs, TUNING_KEY) for name, configs in CONFIG_SETS.items()}


def bwd_configs(head_dim: int, fp32: bool):
    """((BLOCK_M, BLOCK_N, num_warps, num_stages) of the dQ kernel, the same of the dK/dV kernel) on CUDA.

    Fixed tiles, chosen with the sm_90 build check (kernels/README.md has the table): no register spills
    (checked with Triton 3.8's and 3.6's ptxas) and, up to head_dim 128, score tiles of 128 rows on 8
    warps -- two warpgroups of 64 rows -- so that no score is held, or exponentiated, twice (a 64-row
    tile on 8 warps splits the keys across the warpgroups, and each re-computes the other's
    probabilities for the next product). dQ programs own BLOCK_M queries, dK/dV programs BLOCK_N keys;
    past head_dim 64 (and in float32) dK/dV runs as two launches, dV then dK (``bwd_kernel_args``).
    head_dim 256 trades that for fewer spills: 64-row dQ tiles (exp2 twice per score), and its dK half
    still spills 8 registers.
    """
    if fp32:  # full-precision dots (no tensor cores): small tiles
        return (64, 32, 8, 2), (32, 64, 8, 2)
    if head_dim <= 64:
        return (128, 64, 8, 2), (32, 128, 8, 2)
    if head_dim <= 128:
        return (128, 32, 8, 2), (32, 128, 8, 2)
    return (64, 16, 8, 2), (16, 128, 8, 2)
