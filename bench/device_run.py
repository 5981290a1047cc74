"""Every device check in one command: what a session runs the moment a GPU is lent (issue 17).

Parts, in priority order, each written as ``<gpu>-<part>.json`` under ``--out`` as soon as it ends (and
rewritten while it runs), then ``summary.md`` (goals beside figures) and a short table printed last:

  env        machine, versions, clocks; the two ceilings: a device-to-device copy's GB/s and a bf16
             matmul's TFLOP/s (every figure below is put against them)
  check      bf16 correctness, one quick pass: rope_attention forward (each ROPE_K mode) and fused
             backward on the PE-L frame and temporal shapes, patchify_normalize; error vs fp32 <= 2x the
             PyTorch bf16 path's. A kernel found wrong is not timed below; the run goes on
  rope_fwd   rope_attention forward, 256 and 64 frames x 577 tokens (16 heads, d 64, packed, q/k/v strided
             views of one qkv), the temporal shape (64 clips of 1-17 tokens, 14 heads, d 128, padded) and,
             last, joint 3D clip attention: each ROPE_K mode a row, against compiled RoPE + SDPA with each
             backend forced, FlexAttention, flash-attn if importable; useful TFLOP/s, error vs fp32, the
             speed-up over the best other row, the fastest mode
  rope_bwd   forward + backward, 256 frames and temporal, the same providers: time, TFLOP/s, peak memory
  patchify   patchify_normalize GB/s against a device-to-device copy in the same run
  tower      the pe-av-large video tower (bf16, random weights): fidelity vs transformers fp32, then
             pevideo fast / fast+compile / fast as a CUDA graph / eager vs transformers (sdpa), full and
             padded batches, each fast op's kernel_report
  embed      the embedding pipeline (decode workers feeding the encoder): encoder busy share, clips/s
             beside decoding alone (PyAV carried as a wheel; without it, frames decoded ahead)
  gpu_tests  ``pytest -m gpu`` with what is left of the budget

``--budget`` (seconds from start, default 420) is shared: a part starts only if the time left covers its
estimate, else it is skipped with a line saying so; at budget + 45 s a watchdog writes the summary, packs
what exists and exits, so a run cut short still brings back everything finished. Triton's cache (compiled
kernels and autotuning results: the kernels' candidate sets are small and fixed) and Inductor's live
under ``--out``, so a second call on the same warm machine with the same ``--out`` skips that work.

On a GPU machine (the ``run`` tool: nvidia-h200, Python 3.12, torch 2.11, triton 3.6, transformers 5.17,
no PyAV, no registry). Once, in the checkout the tool sends (its .gitignore ignores ``.whl/``)::

    python bench/device_run.py --prepare        # pip download PyAV for cp312 into .whl/ (~36 MB)

then the ``run`` tool with ``carry: [".whl"]``, ``timeout_s: 500`` and this command::

    export PYTHONUNBUFFERED=1; ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; PYTHONPATH=/tmp/site:$PWD:$PWD/kernels python3 bench/device_run.py --out /tmp/devrun --pack "$OUT"

It brings back three files: ``<gpu>-device-run.tar.gz`` (every part's JSON, summary.md, the full log,
the autotuning choices), ``summary.md`` and ``run.log``. Unpack with
``tar xzf <files_at>/<gpu>-device-run.tar.gz -C bench/results/`` and commit ``bench/results/<gpu>-device-run/``.
A second, shorter call for what the first left undone (its table says which): at once, while the machine is
warm (30 s; then its caches under ``--out`` are reused and its summary covers both calls), the same command
with ``--parts tower,embed --budget 240`` and ``timeout_s: 300``. Unpack each call's tarball into the same
folder (a later part JSON replaces an earlier one of the same part), then
``python bench/device_run.py --summarize bench/results/<gpu>-device-run`` rebuilds summary.md from all.

Without a GPU the same command runs ``env`` and says why it skipped the rest. ``--smoke`` runs every part
on tiny shapes on CPU (Triton's interpreter for the kernels, torch.compile with the eager backend) in
about a minute and checks that each part's JSON has the fields summary.md reads (tests/test_device_run.py)::

    python bench/device_run.py --smoke --out /tmp/devrun-smoke
"""
from __future__ import annotations

import argparse
import io
import os
import signal
import sys
import tarfile
import threading
import time
import traceback

T0 = time.monotonic()  # the budget counts from here, imports included
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AV_WHEEL = "av==18.1.0"  # abi3 (cp311+) manylinux_2_28 x86-64 wheel: runs on the image's Python 3.12
GRACE_S = 45.0  # past the budget, the watchdog packs what exists and exits (--grace)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


class Part:
    def __init__(self, name, fn_name, module, needs_gpu, estimate_s, cap_s=None):
        self.name, self.fn_name, self.module = name, fn_name, module
        self.needs_gpu, self.estimate_s, self.cap_s = needs_gpu, estimate_s, cap_s

    def fn(self):
        mod = __import__(self.module)
        return getattr(mod, self.fn_name)


# (name, function, module, needs a GPU outside --smoke, least GPU seconds worth starting it with, the most
# seconds it may start new cases in: a part that checks the clock between cases leaves the rest to later
# parts; compilation and autotuning, not the timing, are most of each)
PARTS = [
    Part("env", "part_env", "device_run_kernels", False, 10),
    Part("check", "part_check", "device_run_kernels", True, 40),
    Part("rope_fwd", "part_rope_fwd", "device_run_kernels", True, 45, cap_s=100),
    Part("rope_bwd", "part_rope_bwd", "device_run_kernels", True, 45, cap_s=80),
    Part("patchify", "part_patchify", "device_run_kernels", True, 10),
    Part("tower", "part_tower", "device_run_model", True, 90),
    Part("embed", "part_embed", "device_run_model", True, 45),
    Part("gpu_tests", "part_gpu_tests", "device_run_model", True, 60),
]
PART_NAMES = [p.name for p in PARTS]


class Tee(io.TextIOBase):
    """Writes go to the console and to the run's log file."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, s):
        self.stream.write(s)
        try:
            self.log.write(s)
        except ValueError:  # log closed at exit
            pass
        return len(s)

    def flush(self):
        self.stream.flush()
        self.log.flush()

    def isatty(self):
        return False


class Context:
    """What a part function gets: settings, the clock, state from earlier parts, and ``save``."""

    def __init__(self, args, runner):
        import torch

        self.args, self.runner = args, runner
        self.smoke = args.smoke
        self.gpu = torch.cuda.is_available() and not args.smoke
        self.device = torch.device("cuda" if self.gpu else "cpu")
        self.dtype = torch.bfloat16 if self.gpu else torch.float32
        # smoke: torch.compile traces (dynamo) but generates no code (Inductor on CPU takes minutes)
        self.compile_kw = {"backend": "eager"} if args.smoke else {}
        # every case compiles the same RoPE / Flex functions again at new shapes: past dynamo's limit
        # they would fall back to eager without a word
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
        self.state: dict = {"verdicts": {}}
        self.part = None
        self.part_deadline = None  # monotonic time after which the running part starts nothing new

    def left(self) -> float:
        """Seconds the running part may still start work in: the budget's, or its own cap's if sooner."""
        left = self.runner.left()
        if self.part_deadline is not None and not self.smoke:
            left = min(left, self.part_deadline - time.monotonic())
        return left

    def save(self, report: dict) -> None:
        """Write the running part's JSON now (status 'running'): a run cut short keeps what is done."""
        self.runner.write_part(self.part, dict(report, status="running"))


class Runner:
    def __init__(self, args):
        from pevideo.benchtools import machine_info, machine_slug, package_versions

        self.args = args
        self.t0 = T0
        self.out = os.path.abspath(args.out)
        self.machine = machine_info("cuda" if (not args.smoke and _cuda()) else "cpu",
                                    versions=package_versions("transformers", "timm", "numpy", "av", "flash-attn"))
        self.slug = machine_slug(self.machine)
        self.reports: dict[str, dict] = {}
        self.lock = threading.RLock()  # (SIGTERM's handler runs on the main thread, maybe inside finish)
        self.finished = False
        self.ctx = Context(args, self)
        self.log_path = None

    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.t0)

    def path(self, part: str) -> str:
        return os.path.join(self.out, f"{self.slug}-{part}.json")

    def write_part(self, part: str, report: dict) -> None:
        from pevideo.benchtools import write_json

        report = {"part": part, "smoke": self.args.smoke, "machine": self.machine, **report}
        self.reports[part] = report
        write_json(self.path(part), report, machine=self.machine)

    def load_earlier(self, part: str) -> None:
        import json

        try:
            with open(self.path(part), encoding="utf-8") as f:
                report = json.load(f)
        except (OSError, ValueError):
            return
        report.setdefault("reason", None)
        report["earlier_run"] = report.get("date")
        self.reports[part] = report

    def run_part(self, part: Part) -> None:
        from pevideo.benchtools import gpu_clocks

        ctx = self.ctx
        ctx.part = part.name
        ctx.part_deadline = time.monotonic() + part.cap_s if part.cap_s else None
        reason = None
        if part.needs_gpu and not ctx.gpu and not ctx.smoke:
            reason = ("no CUDA GPU here (torch.cuda.is_available() is False); --smoke runs this part on tiny "
                      "CPU shapes")
        elif part.name != "env" and self.left() < (0 if ctx.smoke else part.estimate_s):
            reason = (f"budget: {max(0, self.left()):.0f} s left, the part needs about "
                      f"{0 if ctx.smoke else part.estimate_s} s (rerun with --parts {part.name})")
        if reason:
            print(f"[{part.name}] skipped: {reason}", flush=True)
            self.write_part(part.name, {"status": "skipped", "reason": reason})
            return
        print(f"\n[{part.name}] started, {self.left():.0f} s of the budget left", flush=True)
        start = time.monotonic()
        before = gpu_clocks() if ctx.gpu else None
        try:
            report = part.fn()(ctx) or {}
            status = report.pop("status", "ok")
            reason = report.pop("reason", None)
        except Exception as exc:  # noqa: BLE001  (one part failing must not end the run)
            traceback.print_exc()
            report, status = dict(self.reports.get(part.name, {})), "failed"
            reason = f"{type(exc).__name__}: {str(exc)[:500]}"
        report.update(status=status, reason=reason, elapsed_s=round(time.monotonic() - start, 1),
                      budget_left_s=round(self.left(), 1), clocks_before=before,
                      clocks_after=gpu_clocks() if ctx.gpu else None)
        self.write_part(part.name, report)
        print(f"[{part.name}] {status} in {report['elapsed_s']} s" + (f": {reason}" if reason else ""), flush=True)
        _free_device_memory()

    def finish(self, note: str | None = None) -> int:
        """summary.md, the pack, and the short table last. Once (the watchdog and the main thread race)."""
        import device_run_summary as S

        with self.lock:
            if self.finished:
                return 0
            self.finished = True
            reports = {p: self.reports[p] for p in PART_NAMES if p in self.reports}
            problems = S.check_fields(reports, self.args.parts) if self.args.smoke else []
            summary = S.write_summary(os.path.join(self.out, "summary.md"), reports, self.machine,
                                      budget=self.args.budget, elapsed=time.monotonic() - self.t0, note=note)
            print("\n" + S.final_table(reports, self.machine, time.monotonic() - self.t0, self.args.budget))
            if note:
                print(note)
            if problems:
                print("smoke: FAILED, fields summary.md reads are missing:\n  " + "\n  ".join(problems))
            elif self.args.smoke:
                print("smoke: ok (every part ran on tiny CPU shapes; its JSON has what summary.md reads)")
            sys.stdout.flush()
            packed = pack(self.out, self.slug, self.args.pack, self.log_path) if self.args.pack else None
            print(f"results: {self.out} ({self.slug}-<part>.json, {os.path.basename(summary)})"
                  + (f"; packed: {packed}" if packed else ""), flush=True)
            return 1 if problems else 0

    def stop(self, why: str) -> None:
        """Cut the run short: summary, pack and table from what exists, then exit 3 at once."""
        self.finish(note=f"{why}; the part running then ({self.ctx.part}) was cut off (its JSON holds what it had "
                         "saved)")
        sys.stdout.flush()
        os._exit(3)


def pack(out: str, slug: str, dest: str, log_path: str | None = None) -> str:
    """One tar.gz of the results (every JSON, summary.md, the runs' logs, Triton's autotuning choices) plus
    summary.md and this run's log (as run.log) beside it: three files, inside the tool's 8 of 16 MiB."""
    import shutil

    os.makedirs(dest, exist_ok=True)
    name = f"{slug}-device-run"
    target = os.path.join(dest, name + ".tar.gz")
    tmp = target + ".tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for f in sorted(os.listdir(out)):
            full = os.path.join(out, f)
            if os.path.isfile(full) and f.endswith((".json", ".md", ".log", ".png")):
                tar.add(full, arcname=f"{name}/{f}")
        cache = os.path.join(out, "triton-cache")
        for dirpath, _, files in os.walk(cache):
            for f in files:
                if f.endswith(".autotune.json"):
                    tar.add(os.path.join(dirpath, f), arcname=f"{name}/autotune/{os.path.basename(dirpath)[:12]}-{f}")
    os.replace(tmp, target)
    if os.path.abspath(dest) != out:
        shutil.copyfile(os.path.join(out, "summary.md"), os.path.join(dest, "summary.md"))
        if log_path:
            shutil.copyfile(log_path, os.path.join(dest, "run.log"))
    return target


def summarize(folder: str) -> int:
    """summary.md and the table again, from every part JSON in ``folder`` (e.g. two calls' packs unpacked
    into one folder: each part's latest JSON counts)."""
    import glob
    import json

    import device_run_summary as S

    envs = sorted(glob.glob(os.path.join(folder, "*-env.json")))
    if not envs:
        print(f"device_run --summarize: no <gpu>-env.json in {folder}", file=sys.stderr)
        return 2
    slug = os.path.basename(envs[0])[: -len("-env.json")]
    reports = {}
    for part in PART_NAMES:
        path = os.path.join(folder, f"{slug}-{part}.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                reports[part] = json.load(f)
    machine = reports["env"].get("machine", {})
    elapsed = sum(r.get("elapsed_s") or 0 for r in reports.values())
    S.write_summary(os.path.join(folder, "summary.md"), reports, machine, budget=None, elapsed=elapsed,
                    note=f"rebuilt from the part JSONs in {os.path.basename(os.path.abspath(folder))}")
    print(S.final_table(reports, machine, elapsed, None))
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prepare(dest: str) -> int:
    """pip download the wheels the GPU image lacks (PyAV) for CPython 3.12, x86-64, into ``dest``."""
    import subprocess

    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", dest, AV_WHEEL]
    print("+", " ".join(cmd))
    rc = subprocess.call(cmd)
    if rc == 0:
        size = sum(os.path.getsize(os.path.join(dest, f)) for f in os.listdir(dest))
        print(f"{dest}: {size / 2**20:.1f} MiB of wheels; the tree travels with them (64 MiB in all): name "
              f"'{os.path.relpath(dest, ROOT)}' in the run tool's carry")
    return rc


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="pevideo-bench-device",
                   help="results folder: <gpu>-<part>.json, summary.md, run.log, Triton's and Inductor's caches")
    p.add_argument("--pack", default=None,
                   help="also write <gpu>-device-run.tar.gz, summary.md and run.log here (the run tool's $OUT)")
    p.add_argument("--budget", type=float, default=420.0,
                   help="seconds for the whole run, from start (default %(default)s); a part starts only if it fits")
    p.add_argument("--grace", type=float, default=GRACE_S,
                   help="seconds past the budget before the watchdog packs what exists and exits (default %(default)s)")
    p.add_argument("--parts", default=None, help=f"comma-separated subset of {PART_NAMES} (env always runs)")
    p.add_argument("--smoke", action="store_true",
                   help="every part on tiny shapes on CPU (Triton's interpreter); checks the JSON fields")
    p.add_argument("--prepare", action="store_true", help="download the PyAV wheel into .whl/ for the GPU image, then exit")
    p.add_argument("--summarize", metavar="DIR", default=None,
                   help="rebuild summary.md and the table from the part JSONs in DIR (e.g. two calls' packs), then exit")
    args = p.parse_args(argv)
    if not (args.budget > 0):
        p.error(f"--budget takes a positive number of seconds, got {args.budget}")
    parts = [x.strip() for x in (args.parts or ",".join(PART_NAMES)).split(",") if x.strip()]
    unknown = sorted(set(parts) - set(PART_NAMES))
    if unknown:
        p.error(f"unknown parts {unknown}; choose from {PART_NAMES}")
    args.parts = ["env", *[x for x in PART_NAMES if x in parts and x != "env"]]
    return args


def setup_environment(args) -> None:
    """Before torch / Triton are imported: the tree first on sys.path, caches under --out, the
    interpreter for --smoke (Triton reads TRITON_INTERPRET when the kernels are defined)."""
    for path in (os.path.join(ROOT, "kernels"), ROOT, os.path.join(ROOT, "bench")):
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)
    os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "kernels"), os.environ.get("PYTHONPATH", "")])
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    os.environ["TRITON_CACHE_DIR"] = os.path.join(out, "triton-cache")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(out, "inductor-cache")
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # tiny CPU shapes even on a GPU machine
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.prepare:
        return prepare(os.path.join(ROOT, ".whl"))
    if args.summarize:
        sys.path.insert(0, os.path.join(ROOT, "bench"))
        return summarize(args.summarize)
    setup_environment(args)
    log_path = os.path.join(os.path.abspath(args.out), time.strftime("run-%Y%m%d-%H%M%S.log"))
    log = open(log_path, "w", encoding="utf-8", buffering=1)
    sys.stdout, sys.stderr = Tee(sys.__stdout__, log), Tee(sys.__stderr__, log)
    print(f"device_run: budget {args.budget:.0f} s, parts {args.parts}, out {os.path.abspath(args.out)}"
          + (" (smoke: tiny CPU shapes)" if args.smoke else ""), flush=True)
    runner = Runner(args)
    runner.log_path = log_path
    timer = threading.Timer(max(0.0, args.budget + args.grace - (time.monotonic() - T0)), runner.stop,
                            args=(f"watchdog: the run passed its budget + {args.grace:.0f} s",))
    timer.daemon = True
    timer.start()
    # the run tool's timeout (or anyone) stopping the run: still bring back what is done
    main_pid = os.getpid()

    def on_sigterm(*_):
        if os.getpid() != main_pid:  # a forked decoding worker being shut down: just go
            os._exit(128 + signal.SIGTERM)
        runner.stop("stopped by SIGTERM")

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        for part in PARTS:
            if part.name in args.parts:
                runner.run_part(part)
            else:  # an earlier call's result in the same --out stays, and the summary covers it
                runner.load_earlier(part.name)
    finally:
        timer.cancel()
    return runner.finish()


if __name__ == "__main__":
    sys.exit(main())
