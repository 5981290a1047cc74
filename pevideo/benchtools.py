"""The one benchmark harness: what machine, how long (warm-up, then min / median / max over repeats),
and JSON that names the machine. Used by ``pevideo bench`` and every script in ``bench/``.

Providers compared against each other are timed *interleaved*: each round runs every provider once
(in an order that rotates from round to round), so a machine that gets busier or quieter during the
run (other jobs, thermal limits) slows all of them alike instead of whichever happened to run then.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["cpu_name", "machine_info", "machine_label", "machine_slug", "Timing", "time_fn", "time_interleaved",
           "wall_clock", "cuda_events", "write_json", "sync", "gpu_clocks", "parse_clocks", "package_versions", "ceilings"]


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "unknown CPU"


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine_info(device: str | torch.device | None = None, **extra) -> dict:
    """What the numbers were measured on: CPU model and cores, GPU (if ``device`` is CUDA, else the
    first visible one, or None), torch / triton / python versions, and the load average when asked
    (a busy machine reads slower; the load says how busy)."""
    dev = torch.device(device) if device is not None else None
    gpu = None
    if torch.cuda.is_available():
        idx = dev.index if dev is not None and dev.type == "cuda" and dev.index is not None else 0
        p = torch.cuda.get_device_properties(idx)
        gpu = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sm_count": p.multi_processor_count,
               "memory_gib": round(p.total_memory / 2**30, 1)}
    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:  # noqa: BLE001  (reported, never fatal)
        triton_version = f"unavailable ({type(exc).__name__})"
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        load = None
    info = {
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": _usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "device": (dev.type if dev is not None else ("cuda" if gpu else "cpu")),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1_5_15min": load,
    }
    info["label"] = machine_label(info)
    info.update(extra)
    return info


def machine_label(info: dict) -> str:
    """One line naming the machine: the GPU when the run used one, else the CPU and its cores."""
    if info.get("device") == "cuda" and info.get("gpu"):
        return info["gpu"]["name"]
    return f"{info['cpu']} ({info['cpu_cores_usable']} cores)"


def machine_slug(info: dict) -> str:
    """File-name prefix for results: ``cpu``, or the GPU's name (e.g. ``h100-80gb-hbm3``)."""
    if info.get("device") != "cuda" or not info.get("gpu"):
        return "cpu"
    s = info["gpu"]["name"].lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-") or "gpu"


def sync(device=None) -> None:
    """Wait for queued GPU work (timings of asynchronous CUDA calls mean nothing without it)."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds per call of one provider, over the timed repeats (warm-up excluded)."""

    times_s: list[float] = field(default_factory=list)

    @property
    def min_s(self) -> float:
        return min(self.times_s)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def max_s(self) -> float:
        return max(self.times_s)

    @property
    def spread(self) -> float:
        """(max - min) / median: 0.05 = the slowest repeat took 5% of the median longer than the fastest."""
        return (self.max_s - self.min_s) / self.median_s if self.median_s > 0 else math.nan

    def as_dict(self) -> dict:
        return {"ms_min": 1e3 * self.min_s, "ms_median": 1e3 * self.median_s, "ms_max": 1e3 * self.max_s,
                "repeats": len(self.times_s)}


def wall_clock(device=None) -> Callable[[Callable[[], object]], float]:
    """A sampler: seconds of one call of ``fn``, by the wall clock, GPU work included (synchronized)."""

    def sample(fn):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0

    return sample


def cuda_events(rep_ms: float = 25.0) -> Callable[[Callable[[], object]], float]:
    """A sampler for short GPU ops: seconds per call as the median of a ``rep_ms`` burst timed with CUDA
    events and the L2 cache flushed between calls (``triton.testing.do_bench``)."""
    from triton.testing import do_bench

    def sample(fn):
        return float(do_bench(fn, warmup=0, rep=rep_ms, return_mode="median")) * 1e-3

    return sample


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    warmup: int = 1,
    repeats: int = 5,
    budget_s: float | None = None,
    min_repeats: int = 3,
    device=None,
    order: list | None = None,
    sampler: Callable[[Callable[[], object]], float] | None = None,
) -> dict[str, Timing]:
    """Time several providers on the same work, round by round.

    Each provider is first called ``warmup`` times (compilation, autotuning, allocator). Then up to
    ``repeats`` rounds each call every provider once; round r starts with provider r mod n, so none is
    always first (or always right after another's garbage). With ``budget_s`` (seconds per provider),
    rounds stop once that much time per provider is spent, after at least ``min_repeats`` rounds.
    ``order``, when given a list, receives the provider names in the order they were timed.
    ``sampler`` turns a provider into one sample in seconds: :func:`wall_clock` (the default) or
    :func:`cuda_events` for GPU ops too short for the wall clock.
    """
    sampler = sampler or wall_clock(device)
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    names = list(fns)
    out = {name: Timing() for name in names}
    for name in names:
        for _ in range(warmup):
            fns[name]()
        sync(device)
    start = time.perf_counter()
    for r in range(repeats):
        if budget_s is not None and r >= min(min_repeats, repeats):
            if time.perf_counter() - start >= budget_s * len(names):
                break
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            out[name].times_s.append(sampler(fns[name]))
            if order is not None:
                order.append(name)
    return out


def time_fn(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5, budget_s: float | None = None,
            min_repeats: int = 3, device=None, sampler=None) -> Timing:
    """One provider: ``warmup`` calls, then up to ``repeats`` timed calls (see :func:`time_interleaved`)."""
    return time_interleaved({"fn": fn}, warmup=warmup, repeats=repeats, budget_s=budget_s,
                            min_repeats=min_repeats, device=device, sampler=sampler)["fn"]


def write_json(path: str, report: dict, machine: dict | None = None) -> str:
    """Write ``report`` as JSON at ``path`` (folders made as needed), with ``machine`` (default: this
    machine, :func:`machine_info`) and the date filled in where the report lacks them. The file is
    replaced whole (written aside, then renamed), so a reader never sees half of it."""
    report = dict(report)
    if "machine" not in report:
        report["machine"] = machine if machine is not None else machine_info()
    report.setdefault("date", datetime.datetime.now().isoformat(timespec="seconds"))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)
    return path


_CLOCK_FIELDS = {"clocks.sm": "sm_mhz", "clocks.mem": "mem_mhz", "clocks.max.sm": "sm_max_mhz",
                 "clocks.max.mem": "mem_max_mhz", "power.draw": "power_w", "temperature.gpu": "temperature_c",
                 "pstate": "pstate", "clocks_throttle_reasons.active": "throttle_reasons"}
_CORE_CLOCK_FIELDS = 4  # the first four: every nvidia-smi knows them (a later one may be renamed)


def parse_clocks(line: str, fields: list[str]) -> dict:
    """One ``nvidia-smi --format=csv,noheader,nounits`` row -> {our name: number, or text as given}."""
    clocks = {}
    for name, v in zip(fields, (x.strip() for x in line.split(","))):
        try:
            clocks[_CLOCK_FIELDS[name]] = float(v)
        except ValueError:
            clocks[_CLOCK_FIELDS[name]] = v
    return clocks


def gpu_clocks(index: int = 0) -> dict | None:
    """The GPU's clocks, power and temperature now, as ``nvidia-smi`` reads them (read-only; a GPU that
    clocks down mid-run shows here), or None without a CUDA GPU."""
    if not torch.cuda.is_available():
        return None
    error = None
    for fields in (list(_CLOCK_FIELDS), list(_CLOCK_FIELDS)[:_CORE_CLOCK_FIELDS]):
        try:
            out = subprocess.run(["nvidia-smi", f"--id={index}", "--query-gpu=" + ",".join(fields),
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError) as exc:
            return {"error": f"nvidia-smi: {type(exc).__name__}: {exc}"}
        if out.returncode == 0 and out.stdout.strip():
            return parse_clocks(out.stdout.strip().splitlines()[0], fields)
        error = f"nvidia-smi exit {out.returncode}: {(out.stderr or out.stdout).strip()[:200]}"
    return {"error": error}


def package_versions(*names: str) -> dict:
    """Installed version of each distribution (None where it is missing): what a result depends on."""
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def ceilings(device, *, gemm_n: int | None = None, copy_bytes: int | None = None, rep_ms: float = 100.0) -> dict:
    """The two ceilings every figure is put against, measured now: a device-to-device copy's GB/s
    (bytes read + written) and a square matmul's TFLOP/s on random data (bf16 on a GPU, float32 on CPU).
    GPU: CUDA-event bursts (``triton.testing.do_bench``, median); CPU: the wall clock."""
    dev = torch.device(device)
    gpu = dev.type == "cuda"
    gemm_n = gemm_n or (8192 if gpu else 512)
    copy_bytes = copy_bytes or ((2 if gpu else 1 / 16) * 2**30)
    copy_bytes = int(copy_bytes)
    dtype = torch.bfloat16 if gpu else torch.float32
    sampler = cuda_events(rep_ms) if gpu else wall_clock(dev)
    a = torch.randn(gemm_n, gemm_n, device=dev, dtype=dtype)
    b = torch.randn(gemm_n, gemm_n, device=dev, dtype=dtype)
    mm = time_fn(lambda: torch.mm(a, b), warmup=2, repeats=5, min_repeats=3, device=dev, sampler=sampler)
    del a, b
    src = torch.randint(0, 256, (copy_bytes,), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    cp = time_fn(lambda: dst.copy_(src), warmup=2, repeats=5, min_repeats=3, device=dev, sampler=sampler)
    del src, dst
    if gpu:
        torch.cuda.empty_cache()
    return {
        "matmul_tflops": 2 * gemm_n**3 / mm.median_s / 1e12, "matmul_tflops_range": [
            2 * gemm_n**3 / mm.max_s / 1e12, 2 * gemm_n**3 / mm.min_s / 1e12],
        "matmul_dtype": str(dtype).replace("torch.", ""), "gemm_n": gemm_n,
        "copy_gbps": 2 * copy_bytes / cp.median_s / 1e9, "copy_gbps_range": [
            2 * copy_bytes / cp.max_s / 1e9, 2 * copy_bytes / cp.min_s / 1e9],
        "copy_bytes": copy_bytes,
    }
