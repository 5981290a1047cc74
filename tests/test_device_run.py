"""bench/device_run.py, the one prepared GPU run (issue 17), on CPU: the smoke (every part on tiny shapes,
each part's JSON holding what summary.md reads, the pack fitting the device tool's limits), the budget and
SIGTERM (what is done comes back), and a kernel with wrong numbers losing only its own timing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "device_run.py")
sys.path.insert(0, os.path.join(ROOT, "bench"))

import device_run  # noqa: E402
import device_run_summary as S  # noqa: E402


def _run(*args, timeout=900):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _reports(out, parts=device_run.PART_NAMES):
    return {p: json.loads((out / f"cpu-{p}.json").read_text()) for p in parts}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    base = tmp_path_factory.mktemp("device_run")
    t0 = time.monotonic()
    proc = _run("--smoke", "--out", base / "out", "--pack", base / "pack")
    print(f"device_run --smoke took {time.monotonic() - t0:.0f} s")
    return proc, base / "out", base / "pack"


def test_smoke_runs_every_part_and_writes_what_the_summary_reads(smoke):
    proc, out, pack = smoke
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "smoke: ok" in proc.stdout
    reports = _reports(out)
    for part, r in reports.items():
        assert r["part"] == part and r["smoke"] is True and r["machine"]["label"]
        if part == "gpu_tests":
            assert r["status"] == "skipped" and "GPU" in r["reason"]
        else:
            assert r["status"] == "ok", (part, r.get("reason"))
    assert S.check_fields(reports) == []
    # each ROPE_K mode is its own row, beside every provider asked for
    modes = reports["env"]["rope_k"]["modes"]
    assert len(modes) >= 2
    want = {f"pevideo[{m}]" for m in modes} | {"sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex", "flash_attn"}
    for part in ("rope_fwd", "rope_bwd"):
        for case in reports[part]["cases"]:
            assert want <= set(case["providers"]), (part, case["case"])
    assert {"pevideo fast", "pevideo fast+compile", "pevideo eager", "transformers (sdpa)"} <= {
        r["provider"] for r in reports["tower"]["results"]} or reports["tower"]["notes"]
    # ceilings measured first, and the rope rows put against them
    c = reports["env"]["ceilings"]
    assert c["copy_gbps"] > 0 and c["matmul_tflops"] > 0 and reports["rope_fwd"]["floors"]["copy_gbps"] == c["copy_gbps"]
    summary = (out / "summary.md").read_text()
    for part in ("check", "rope_fwd", "rope_bwd", "patchify", "tower", "embed"):
        assert f"## {part}" in summary
    assert "ROPE_K winner" in summary and "goal" in summary
    # the closing table is the end of the output (the device tool returns only the last 12,000 characters)
    tail = proc.stdout[-3000:]
    assert "part       status" in tail and all(p in tail for p in device_run.PART_NAMES)


def test_pack_fits_the_device_tools_limits(smoke):
    _, out, pack = smoke
    files = [f for f in pack.rglob("*") if f.is_file()]
    assert 1 <= len(files) <= 8
    for f in files:
        assert f.stat().st_size < 16 * 2**20 and len(f.relative_to(pack).parts) <= 3
    (tar_path,) = [f for f in files if f.name.endswith(".tar.gz")]
    with tarfile.open(tar_path) as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
    assert {f"cpu-{p}.json" for p in device_run.PART_NAMES} | {"summary.md"} <= names
    assert any(n.startswith("run-") and n.endswith(".log") for n in names)
    assert (pack / "summary.md").read_text() == (out / "summary.md").read_text()
    assert "part       status" in (pack / "run.log").read_text()  # the log is packed after the table
    # two calls' packs unpacked into one folder: summary.md rebuilt from all their parts
    with tarfile.open(tar_path) as tar:
        tar.extractall(out.parent / "unpacked", filter="data")
    folder = out.parent / "unpacked" / "cpu-device-run"
    (folder / "summary.md").unlink()
    assert device_run.main(["--summarize", str(folder)]) == 0
    rebuilt = (folder / "summary.md").read_text()
    assert "rebuilt from the part JSONs" in rebuilt and "## rope_fwd" in rebuilt and "ROPE_K winner" in rebuilt


def test_budget_skips_parts_and_says_so(tmp_path):
    proc = _run("--smoke", "--budget", "0.001", "--parts", "env,check", "--out", tmp_path)
    assert proc.returncode == 1  # a smoke that could not run a part fails
    assert "[check] skipped: budget" in proc.stdout and "smoke: FAILED" in proc.stdout
    reports = _reports(tmp_path, ["env", "check"])
    assert not (tmp_path / "cpu-rope_fwd.json").exists()  # parts not asked for write nothing
    assert reports["env"]["status"] == "ok"  # env always runs: every figure is put against its ceilings
    assert reports["check"]["status"] == "skipped" and reports["check"]["reason"].startswith("budget")
    assert (tmp_path / "summary.md").exists()


def test_sigterm_brings_back_what_is_done(tmp_path):
    out, pack = tmp_path / "out", tmp_path / "pack"
    proc = subprocess.Popen([sys.executable, SCRIPT, "--smoke", "--parts", "env,rope_bwd", "--out", str(out),
                             "--pack", str(pack)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        env = out / "cpu-env.json"
        while time.monotonic() < deadline and proc.poll() is None:
            if env.exists() and json.loads(env.read_text())["status"] == "ok":
                break
            time.sleep(0.5)
        assert proc.poll() is None, "finished before it could be stopped"
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        text, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 3, text[-3000:]
    assert "stopped by SIGTERM" in text and "part       status" in text
    assert json.loads((out / "cpu-env.json").read_text())["status"] == "ok"
    assert "stopped by SIGTERM" in (pack / "summary.md").read_text()
    assert list(pack.glob("cpu-device-run.tar.gz"))


def test_wrong_numbers_stop_only_that_kernels_timing(tmp_path, monkeypatch):
    """One ROPE_K mode made to compute wrong numbers: check says so (forward and backward), rope_fwd
    does not time it, and times every other row."""
    import device_run_kernels as K
    from pevideo_kernels import rope_attention_ref

    B = K.bra()
    modes, _, _ = K.rope_k()
    bad = modes[-1]
    # pevideo's rows computed by the reference (right, whatever the interpreter does), the bad mode's off by 1%
    monkeypatch.setattr(B, "prov_pevideo", lambda c: (lambda: rope_attention_ref(c.q, c.k, c.v, **c.kw)))
    monkeypatch.setattr(B, "_bwd_forward", lambda c, name: (lambda q, k, v: rope_attention_ref(q, k, v, **c.kw)))
    real_forced = K.forced

    def forced(mode, fn):
        run = real_forced(mode, fn)
        return (lambda *a, **kw: run(*a, **kw) * 1.01) if mode == bad else run

    monkeypatch.setattr(K, "forced", forced)

    class Runner:
        def left(self):
            return 1e9

        def write_part(self, part, report):
            pass

    ctx = device_run.Context(device_run.parse_args(["--smoke", "--out", str(tmp_path)]), Runner())
    check = K.part_check(ctx)
    v = check["kernels"]
    assert not v[f"rope_attention[{bad}]"]["ok"] and "error" in v[f"rope_attention[{bad}]"]["reason"]
    assert not v[f"rope_attention_bwd[{bad}]"]["ok"] and "gradient error" in v[f"rope_attention_bwd[{bad}]"]["reason"]
    for m in modes[:-1]:
        assert v[f"rope_attention[{m}]"]["ok"] and v[f"rope_attention_bwd[{m}]"]["ok"]
    fwd = K.part_rope_fwd(ctx)
    for case in fwd["cases"]:
        rows = case["providers"]
        assert rows[f"pevideo[{bad}]"]["status"].startswith("not timed: wrong in check")
        assert "ms" not in rows[f"pevideo[{bad}]"]
        assert all("ms" in rows[f"pevideo[{m}]"] for m in modes[:-1])
        assert "ms" in rows["sdpa_flash"] and "ms" in rows["flex"]
        assert case["rope_k_winner"] in modes[:-1]


def test_field_check_names_what_is_missing():
    report = {"status": "ok", "rope_k_winner": {"mode": "loop", "decided_on": "frames2"}, "cases": [{
        "case": "frames2", "desc": "d", "flops": 1.0, "best_other": "flex", "rope_k_winner": "loop", "goal_met": None,
        "providers": {"pevideo[loop]": {"status": "ok", "ms": 1.0, "ms_min": 1.0, "ms_max": 1.0, "tflops": 1.0,
                                        "err_max": 0.0},  # err_rms missing
                      "flash_attn": {"status": "unavailable: no module"}}}]}
    problems = S.check_fields({"rope_fwd": report})
    assert "rope_fwd: cases[0].providers.pevideo[loop].err_rms" in problems
    assert not any("flash_attn" in p for p in problems)  # rows that did not run need no figures
    assert "env: no report" in problems


def test_judge_wants_finite_and_within_twice_pytorchs_error():
    import device_run_kernels as K

    t = {"rms": 1e-3, "max": 1e-2}
    assert K.judge({"rms": 2e-3, "max": 2e-2, "finite": True}, t, 0.0) == (True, None)
    assert not K.judge({"rms": 2.1e-3, "max": 1e-2, "finite": True}, t, 0.0)[0]
    assert not K.judge({"rms": 0.0, "max": 0.0, "finite": False}, t, 0.0)[0]


def test_ceilings_and_clocks_on_cpu():
    from pevideo.benchtools import ceilings, parse_clocks

    c = ceilings("cpu", gemm_n=64, copy_bytes=2**20)
    assert c["copy_gbps"] > 0 and c["matmul_tflops"] > 0 and c["matmul_dtype"] == "float32"
    lo, hi = c["copy_gbps_range"]
    assert lo <= c["copy_gbps"] <= hi
    fields = ["clocks.sm", "clocks.mem", "pstate"]
    assert parse_clocks("1980, 3201, P0", fields) == {"sm_mhz": 1980.0, "mem_mhz": 3201.0, "pstate": "P0"}
    if not torch.cuda.is_available():
        from pevideo.benchtools import gpu_clocks

        assert gpu_clocks() is None
