"""summary.md and the closing table of bench/device_run.py, from the parts' JSON reports; and FIELDS, what
they read from each part (``--smoke`` checks every part's JSON has them, so the summary cannot rot).

Paths in FIELDS: ``a.b`` a key, ``a[]`` every item of a non-empty list, ``a{}`` every value of a
non-empty mapping, ``a{ok}`` every value whose status is "ok". A key must be present; its value may be
None (e.g. no speed-up where the other providers could not run).
"""
from __future__ import annotations

import datetime

_OK_ROWS = "providers{ok}"
FIELDS = {
    "env": ["machine.label", "versions.torch", "versions.triton", "versions.transformers", "rope_k.modes",
            "rope_k.default", "ceilings.copy_gbps", "ceilings.matmul_tflops", "ceilings.matmul_dtype"],
    "check": ["rule", "kernels{}.ok", "kernels{}.reason", "kernels{}.cases"],
    "rope_fwd": ["rope_k_winner.mode", "rope_k_winner.decided_on", "cases[].case", "cases[].desc", "cases[].flops",
                 "cases[].best_other", "cases[].rope_k_winner", "cases[].goal_met", f"cases[].{_OK_ROWS}.ms",
                 f"cases[].{_OK_ROWS}.ms_min", f"cases[].{_OK_ROWS}.ms_max", f"cases[].{_OK_ROWS}.tflops",
                 f"cases[].{_OK_ROWS}.err_max", f"cases[].{_OK_ROWS}.err_rms", "cases[].providers{}.status"],
    "rope_bwd": ["rope_k_winner.mode", "cases[].case", "cases[].best_other", "cases[].rope_k_winner",
                 f"cases[].{_OK_ROWS}.ms", f"cases[].{_OK_ROWS}.tflops", f"cases[].{_OK_ROWS}.grad_err_max",
                 f"cases[].{_OK_ROWS}.saved_mb", "cases[].providers{}.status"],
    "patchify": ["copy_GBps", "goal_met", "cases[].case", "cases[].kernel_GBps", "cases[].reference_GBps",
                 "cases[].kernel_fraction_of_copy", "to_patches_gpu_ms", "processor_cpu_then_gpu_ms"],
    "tower": ["preset", "fidelity.ok", "fidelity.cos_min", "fidelity.kernels", "machine.matmul_tflops", "notes",
              "results[].provider", "results[].batch", "results[].ms", "results[].ms_min", "results[].ms_max",
              "results[].clips_per_s", "results[].frames_per_s", "results[].speedup_vs_transformers",
              "results[].share_of_matmul_rate", "results[].kernels", "goals[].name", "goals[].value", "goals[].met"],
    "embed": ["source", "encoder_only_clips_per_s", "goal_met", "decode_only.clips_per_s", "results[].workers",
              "results[].clips_per_s", "results[].encoder_busy", "results[].waited_on_decoding", "results[].gpu_util"],
    "gpu_tests": ["returncode", "summary_line", "failures"],
}


def _missing(obj, path: str, where: str = "") -> list[str]:
    if not path:
        return []
    head, _, rest = path.partition(".")
    for suffix, kind in (("[]", "list"), ("{ok}", "ok"), ("{}", "map")):
        if head.endswith(suffix):
            key = head[: -len(suffix)]
            if not isinstance(obj, dict) or key not in obj:
                return [f"{where}{key}"]
            items = obj[key]
            if kind == "list":
                if not isinstance(items, list) or not items:
                    return [f"{where}{key}[] (empty)"]
                pairs = [(f"{where}{key}[{i}].", x) for i, x in enumerate(items)]
            else:
                if not isinstance(items, dict) or not items:
                    return [f"{where}{key}{{}} (empty)"]
                pairs = [(f"{where}{key}.{k}.", v) for k, v in items.items()
                         if kind == "map" or (isinstance(v, dict) and v.get("status") == "ok")]
            return [m for w, x in pairs for m in _missing(x, rest, w)]
    if not isinstance(obj, dict) or head not in obj:
        return [f"{where}{head}"]
    return _missing(obj[head], rest, f"{where}{head}.")


def check_fields(reports: dict, parts=None, smoke_skips=("gpu_tests",)) -> list[str]:
    """Problems a smoke run must not have: a part (of ``parts``, default all) that did not end ok, or a field
    summary.md reads missing."""
    problems = []
    for part, paths in FIELDS.items():
        if parts is not None and part not in parts:
            continue
        r = reports.get(part)
        if r is None:
            problems.append(f"{part}: no report")
            continue
        if r.get("status") == "skipped" and part in smoke_skips:
            continue
        if r.get("status") not in ("ok", "partial"):
            problems.append(f"{part}: status {r.get('status')} ({r.get('reason')})")
            continue
        problems += [f"{part}: {m}" for p in paths for m in _missing(r, p)]
    return problems


# --------------------------------------------------------------------------------------------------
# formatting
# --------------------------------------------------------------------------------------------------
def _f(x, fmt=".1f", none="-"):
    return none if x is None else format(x, fmt)


def _met(flag):
    return "-" if flag is None else ("met" if flag else "MISSED")


def _best_row(case):
    b = case.get("best_pevideo")
    return (b, case["providers"][b]) if b else (None, None)


def headline(part: str, r: dict) -> str:
    """One line per part for the closing table."""
    if r.get("status") == "skipped" or r.get("status") == "failed":
        return str(r.get("reason"))[:150]
    try:
        if part == "env":
            c = r["ceilings"]
            v = r["versions"]
            return (f"copy {c['copy_gbps']:.0f} GB/s, {c['matmul_dtype']} matmul {c['matmul_tflops']:.0f} TFLOP/s; "
                    f"torch {v['torch']}, triton {v['triton']}, PyAV {v.get('av') or 'missing'}")
        if part == "check":
            bad = {k: str(v["reason"]) for k, v in r["kernels"].items() if not v["ok"]}
            failed = [k for k, why in bad.items() if ": failed: " in why or ": unavailable: " in why]
            wrong = [k for k in bad if k not in failed]
            if not bad:
                return "all kernels right"
            return "; ".join(x for x in (
                "WRONG numbers: " + ", ".join(wrong) if wrong else "",
                f"FAILED to run: {', '.join(failed)} ({bad[failed[0]].split(': ', 1)[-1][:80]})" if failed else "") if x)
        if part in ("rope_fwd", "rope_bwd"):
            bits = []
            for c in r["cases"]:
                name, row = _best_row(c)
                if row is None:
                    bits.append(f"{c['case']}: no pevideo row")
                    continue
                bits.append(f"{c['case']} {name[8:-1]} {_f(row.get('tflops'), '.0f')} TF/s "
                            f"{_f(row.get('speedup_vs_best_other'), '.2f')}x {c.get('best_other')} [{_met(c.get('goal_met'))}]")
            w = r.get("rope_k_winner", {}).get("mode")
            return "; ".join(bits) + (f"; ROPE_K winner {w}" if w else "")
        if part == "patchify":
            g = next((c for c in r["cases"] if c["case"] == r.get("goal", {}).get("case")), r["cases"][0])
            return (f"{g['case']}: {g['kernel_GBps']:.0f} GB/s = {100 * g['kernel_fraction_of_copy']:.0f}% of copy "
                    f"{r['copy_GBps']:.0f} GB/s [goal 80%: {_met(r['goal_met'])}]")
        if part == "tower":
            fid = r.get("fidelity", {})
            gs = "; ".join(f"{g.get('short', g['name'])} {_f(g['value'], '.2f')} [{_met(g['met'])}]" for g in r["goals"])
            off = ", ".join(fid.get("not_fused") or {})
            return f"fidelity cos {_f(fid.get('cos_min'), '.5f')} ok={fid.get('ok')}" + (
                f" (NOT fused: {off})" if off else "") + f"; {gs}"
        if part == "embed":
            top = max(r["results"], key=lambda x: x["workers"])
            return (f"{top['workers']} workers: {top['clips_per_s']:.1f} clips/s, encoder busy "
                    f"{100 * top['encoder_busy']:.0f}% [goal 80%: {_met(r['goal_met'])}]; decoding alone "
                    f"{_f((r.get('decode_only') or {}).get('clips_per_s'))} clips/s")
        if part == "gpu_tests":
            return str(r.get("summary_line"))
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        return f"(summary could not read the report: {type(exc).__name__}: {exc})"
    return ""


def _took(elapsed, budget) -> str:
    return f"{elapsed:.0f} s of a {budget:.0f} s budget" if budget else f"{elapsed:.0f} s in the parts"


def final_table(reports: dict, machine: dict, elapsed: float, budget: float | None) -> str:
    lines = [f"== device run on {machine.get('label')}: {_took(elapsed, budget)} ==",
             f"{'part':<10} {'status':<8} {'s':>5}  headline"]
    for part, r in reports.items():
        earlier = " (earlier run)" if r.get("earlier_run") else ""
        lines.append(f"{part:<10} {str(r.get('status')):<8} {_f(r.get('elapsed_s'), '.0f'):>5}  "
                     f"{headline(part, r)[:200]}{earlier}")
    return "\n".join(lines)


def _table(head: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    out += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return out + [""]


def _section_check(r):
    rows = []
    for k, v in r["kernels"].items():
        for case, e in v["cases"].items():
            err, t = e.get("err") or {}, e.get("torch_err") or {}
            figure = (f"rms {_f(err.get('rms'), '.2e')} / max {_f(err.get('max'), '.2e')} (PyTorch {_f(t.get('rms'), '.2e')}"
                      f" / {_f(t.get('max'), '.2e')})" if err else
                      f"grad max {_f(e.get('grad_err_max'), '.2e')} (PyTorch {_f(e.get('torch_grad_err_max'), '.2e')})"
                      if "grad_err_max" in e else "")
            rows.append([k, case, "ok" if e["ok"] else f"**WRONG**: {e['why']}", figure])
    return [f"Rule: {r['rule']} (tol {r.get('tolerance')}).", ""] + _table(["kernel", "case", "verdict", "error vs fp32"], rows)


def _section_rope(r, floors_tflops):
    lines = []
    bwd = r.get("backward")
    for c in r["cases"]:
        lines += [f"### {c['case']}: {c['desc']}", ""]
        rows = []
        for name, e in c["providers"].items():
            pct = f"{100 * e['tflops'] / floors_tflops:.0f}%" if floors_tflops and e.get("tflops") else "-"
            err = _f(e.get("grad_err_max" if bwd else "err_max"), ".2e")
            rng = f"({_f(e.get('ms_min'), '.3f')}–{_f(e.get('ms_max'), '.3f')})" if "ms_min" in e else ""
            extra = [_f(e.get("peak_mb"), ".0f")] if bwd else []
            rows.append([name, f"{_f(e.get('ms'), '.3f')} {rng}", _f(e.get("tflops"), ".1f"), pct, err, *extra,
                         _f(e.get("speedup_vs_best_other"), ".2f"), e.get("status")])
        head = ["provider", "ms median (min–max)", "useful TFLOP/s", "of matmul ceiling", "grad err max" if bwd else "err max vs fp32",
                *(["peak MB"] if bwd else []), "× best other", "status"]
        lines += _table(head, rows)
        goal = c.get("goal") or {}
        want = " and ".join(x for x in (f"≥ {goal['tflops']:.0f} TFLOP/s" if goal.get("tflops") else "",
                                         f"≥ {goal.get('speedup', 0):.2f}× the best other" if goal else "") if x)
        lines += [f"Best other: {c.get('best_other')}; fastest ROPE_K: {c.get('rope_k_winner')}; goal {want or '-'}: "
                  f"**{_met(c.get('goal_met'))}**", ""]
    w = r.get("rope_k_winner") or {}
    lines += [f"**ROPE_K winner: {w.get('mode')}** (decided on {w.get('decided_on')}; by case {w.get('by_case')}; "
              f"default today {r.get('rope_k_default')})", ""]
    for s in r.get("skipped_cases", []):
        lines.append(f"- {s['case']} skipped: {s['reason']}")
    return lines


def _section_patchify(r):
    rows = [[c["case"], f"{c['kernel_GBps']:.0f}", f"{100 * c['kernel_fraction_of_copy']:.0f}%", f"{c['reference_GBps']:.0f}"]
            for c in r["cases"]]
    return ([f"Device-to-device copy in the same run: {r['copy_GBps']:.0f} GB/s. Goal: {r.get('goal', {}).get('case')} "
             f"≥ 80% of copy: **{_met(r.get('goal_met'))}**.", ""]
            + _table(["case", "kernel GB/s", "of copy", "PyTorch reference GB/s"], rows)
            + [f"Decoded 360p frames to patches: on the device {r.get('to_patches_gpu_ms', 0):.1f} ms, CPU processor "
               f"+ upload + patchify {r.get('processor_cpu_then_gpu_ms', 0):.1f} ms.", ""])


def _section_tower(r):
    fid = r.get("fidelity", {})
    lines = [f"Fidelity ({fid.get('dtype')}, clips {fid.get('lengths')}): cos min {_f(fid.get('cos_min'), '.6f')}, "
             f"fast error {fid.get('fast_err')}, transformers' own {fid.get('transformers_low_precision_err')}: "
             f"**{'ok' if fid.get('ok') else 'NOT ok' if fid.get('ok') is False else fid.get('error')}** "
             f"(goal: {fid.get('goal')}); kernels {fid.get('kernels')}", ""]
    rows = []
    for x in r["results"]:
        off = {k: v for k, v in (x.get("kernels") or {}).items() if v != "fused"}
        rows.append([x["batch"], x["provider"], f"{x['ms']:.1f} ({x['ms_min']:.1f}–{x['ms_max']:.1f})",
                     f"{x['clips_per_s']:.2f}", f"{x['frames_per_s']:.0f}", _f(x.get("speedup_vs_transformers"), ".2f"),
                     f"{100 * x['share_of_matmul_rate']:.0f}%", "all fused" if x.get("kernels") and not off else (off or "-")])
    lines += _table(["batch", "provider", "ms median (min–max)", "clips/s", "frames/s", "× transformers",
                     "of matmul rate", "kernel_report"], rows)
    lines += _table(["goal", "target", "measured", ""], [[g["name"], g["goal"], _f(g["value"], ".2f"), _met(g["met"])]
                                                          for g in r["goals"]])
    return lines + [f"- {n}" for n in r.get("notes", [])] + [""]


def _section_embed(r):
    rows = [[x["workers"], f"{x['clips_per_s']:.1f}", f"{100 * x['encoder_busy']:.0f}%",
             f"{100 * x['waited_on_decoding']:.0f}%", _f(x.get("gpu_util") and 100 * x["gpu_util"], ".0f")]
            for x in r["results"]]
    d = r.get("decode_only") or {}
    return ([f"Source: {r.get('source')}; encoder alone {r['encoder_only_clips_per_s']:.1f} clips/s; decoding alone "
             f"({d.get('workers')} workers) {_f(d.get('clips_per_s'))} clips/s. Goal: encoder busy ≥ 80%: "
             f"**{_met(r.get('goal_met'))}**.", ""]
            + _table(["decode workers", "clips/s", "encoder busy", "waited on decoding", "GPU util %"], rows))


def write_summary(path: str, reports: dict, machine: dict, budget: float | None, elapsed: float,
                  note: str | None = None) -> str:
    m = machine
    env = reports.get("env", {})
    c = env.get("ceilings") or {}
    lines = [f"# Device run: {m.get('label')}", "",
             f"{datetime.datetime.now().isoformat(timespec='seconds')}; torch {m.get('torch')}, triton {m.get('triton')}, "
             f"CUDA {m.get('cuda')}, Python {m.get('python')}; {_took(elapsed, budget)}.",
             f"Ceilings measured in this run: copy {_f(c.get('copy_gbps'), '.0f')} GB/s (read + write), "
             f"{c.get('matmul_dtype')} matmul {_f(c.get('matmul_tflops'), '.1f')} TFLOP/s.", ""]
    if note:
        lines += [f"**{note}**", ""]
    lines += _table(["part", "status", "seconds", "headline"],
                    [[p, r.get("status"), _f(r.get("elapsed_s"), ".0f"), headline(p, r).replace("|", "/")]
                     for p, r in reports.items()])
    sections = {"check": _section_check, "patchify": _section_patchify, "tower": _section_tower, "embed": _section_embed}
    for part, r in reports.items():
        if part == "env" or r.get("status") not in ("ok", "partial", "running"):
            continue
        lines += [f"## {part}", ""]
        try:
            if part in ("rope_fwd", "rope_bwd"):
                lines += _section_rope(r, c.get("matmul_tflops"))
            elif part in sections:
                lines += sections[part](r)
            else:
                lines += [f"{headline(part, r)}", "", *(f"- {x}" for x in r.get("failures", [])), ""]
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            lines += [f"(could not summarize: {type(exc).__name__}: {exc}; see the JSON)", ""]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path
