"""RoPE + attention, forward + backward (training), for bench_rope_attention.py ``--backward``: pevideo's
fused backward against PyTorch RoPE + SDPA autograd and RoPE + FlexAttention (compiled), on its shapes.

Per provider: milliseconds, useful TFLOP/s with the backward counted as 2.5x the forward's FLOPs, the
best other provider's time over pevideo's (goal >= 1.2x on an H100 in bf16), the largest gradient error
against float32 autograd through the reference, the bytes autograd saves for the backward
(saved_tensors_hooks) and the CUDA peak memory of one step; then the bytes saved by one training step
of a small video tower, fast=True against fast=False. The cases, providers and harness are
bench_rope_attention's, passed in as ``fwd``; bench_rope_attention re-exports these functions bound to
itself (``run_case_backward``, ``print_case_backward``, ``tower_step_memory``, ``_bwd_forward``).
"""
from __future__ import annotations

import json
import os

import torch


BWD_FLOP_FACTOR = 2.5  # the backward's FLOPs, counted as 2.5x the forward's (FlashAttention-2's convention)
BWD_PROVIDERS = ("pevideo", "torch", "flex")
GOAL_BWD_SPEEDUP = 1.2  # over the best other provider, forward + backward, H100 bf16


def _bwd_forward(c, name: str, fwd):
    """The provider's forward as a function of (q, k, v). pevideo's also takes packed frames as the one
    qkv tensor (``.packed``: rope_attention_qkvpacked, as the model calls it; see ``_call``)."""
    if name == "pevideo":
        from pevideo_kernels import rope_attention, rope_attention_qkvpacked

        def forward(q, k, v):
            return rope_attention(q, k, v, **c.kw)

        forward.packed = lambda qkv: rope_attention_qkvpacked(qkv, **c.kw)
        return forward
    if name == "torch":
        return fwd._torch_fn(c)
    if name == "flex":
        return fwd.prov_flex(c)
    raise ValueError(f"no backward for provider {name!r}")


def _bwd_leaves(c):
    """Fresh leaves and how to get (q, k, v) from them: packed frames differentiate the one qkv tensor
    their q, k, v are views of (``c.qkv``, as the model does), the rest q, k and v."""
    if c.qkv is not None:
        x = c.qkv.detach().clone().requires_grad_()
        return (x,), lambda x: x.unbind(1)
    return tuple(t.detach().clone().requires_grad_() for t in (c.q, c.k, c.v)), lambda *t: t


def _call(forward, split, leaves):
    """``forward`` on the leaves: the packed tensor itself where it takes one (``.packed``), else q, k, v."""
    packed = getattr(forward, "packed", None)
    if packed is not None and len(leaves) == 1:
        return packed(*leaves)
    return forward(*split(*leaves))


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves while ``fn()`` runs (its activation memory):
    torch.autograd.graph.saved_tensors_hooks, exact and the same on CPU and GPU."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def run_case_backward(c, providers, quick, fwd, time_it=True):
    """Forward + backward per provider: gradient error against float32 autograd through the reference,
    bytes saved for the backward, CUDA peak memory of one step, time and useful TFLOP/s. ``providers``:
    names in BWD_PROVIDERS, or a mapping name -> factory(c) returning the forward as a function of (q, k, v)."""
    from pevideo_kernels import rope_attention_ref

    flops = c.flops * (1 + BWD_FLOP_FACTOR)
    res = {"case": c.name, "desc": c.desc + " (forward + backward)", "flops": flops, "bytes": c.bytes,
           "providers": {}}
    g = torch.randn(*c.q.shape[:-1], c.v.shape[-1], device=c.q.device, dtype=c.q.dtype,
                    generator=torch.Generator(c.q.device).manual_seed(0))
    ref_leaves, split = _bwd_leaves(c)
    ref_leaves = tuple(x.detach().float().requires_grad_() for x in ref_leaves)
    rope_attention_ref(*split(*ref_leaves), **c.kw).backward(g.float())
    ref_grads = [x.grad for x in ref_leaves]
    fns = {}
    for name in providers:
        entry = {}
        try:
            forward = providers[name](c) if isinstance(providers, dict) else _bwd_forward(c, name, fwd)
            leaves, split = _bwd_leaves(c)

            def step(forward=forward, leaves=leaves, split=split):
                for x in leaves:
                    x.grad = None
                _call(forward, split, leaves).backward(g)

            entry["saved_mb"] = saved_bytes(lambda: _call(forward, split, leaves)) / 1e6
            if c.q.is_cuda:
                step()  # compile / autotune first
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                step()
                torch.cuda.synchronize()
                entry["peak_mb"] = (torch.cuda.max_memory_allocated() - before) / 1e6
            else:
                step()
            err = max((x.grad.float() - r).abs().max().item() for x, r in zip(leaves, ref_grads))
            entry["grad_err_max"] = err
            entry["status"] = "ok"
            fns[name] = step
        except Exception as exc:  # noqa: BLE001  (one provider failing must not end the run)
            entry["status"] = fwd._failure(exc)
        res["providers"][name] = entry
    if time_it and fns:
        from pevideo.benchtools import time_interleaved

        timings = time_interleaved(fns, warmup=1, repeats=3 if quick else 7, min_repeats=3, sampler=fwd.sampler(quick))
        for name, t in timings.items():
            ms = 1e3 * t.median_s
            res["providers"][name].update(ms=ms, ms_min=1e3 * t.min_s, ms_max=1e3 * t.max_s,
                                          tflops=flops / (ms * 1e-3) / 1e12)
        others = [e["ms"] for n, e in res["providers"].items() if n != "pevideo" and "ms" in e]
        pv = res["providers"].get("pevideo", {})
        if others and "ms" in pv:
            res["speedup_vs_best_other"] = min(others) / pv["ms"]
    return res


def print_case_backward(res):
    print(f"\n== {res['case']}: {res['desc']}")
    print(f"   {res['flops'] / 1e9:.1f} GFLOP useful (backward counted as {BWD_FLOP_FACTOR}x the forward)")
    print(f"   {'provider':<9} {'ms':>9} {'TFLOP/s':>8} {'saved MB':>9} {'peak MB':>8} {'grad err':>9}  status")
    for name, e in res["providers"].items():
        def f(key, width, fmt):
            return (format(e[key], fmt) if key in e else "-").rjust(width)
        print(f"   {name:<9} {f('ms', 9, '.3f')} {f('tflops', 8, '.1f')} {f('saved_mb', 9, '.2f')} "
              f"{f('peak_mb', 8, '.1f')} {f('grad_err_max', 9, '.2e')}  {e['status']}")
    if "speedup_vs_best_other" in res:
        print(f"   pevideo vs best other: {res['speedup_vs_best_other']:.2f}x (goal {GOAL_BWD_SPEEDUP}x)")


def tower_step_memory(device: str = "cpu", frames: int = 3) -> dict:
    """Bytes autograd saves in one training step of a small PE video tower (2 blocks, 8x8 patches per
    frame), fast=True against fast=False: {"fast_mb", "eager_mb", "attention_fast_mb", "attention_eager_mb"}.
    The attention figures count only what the attention ops save."""
    from transformers import PeVideoConfig

    import pevideo
    import pevideo.dispatch as dispatch

    text = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, vocab_size=97,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    vision = dict(architecture="vit_pe_core_tiny_patch16_384", num_labels=32,
                  model_args=dict(embed_dim=64, depth=2, num_heads=2, img_size=128))
    cfg = PeVideoConfig(text_config=text, video_config=dict(
        vision_config=vision, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        head_dim=12))
    torch.manual_seed(0)
    pixels = torch.randn(2, frames, 3, 128, 128, device=device)
    mask = torch.tensor([[True] * frames, [True] + [False] * (frames - 1)], device=device)
    out = {}
    real = {name: getattr(dispatch.Ops, name) for name in ("attention", "attention_qkvpacked")}
    for fast in (True, False):
        model = pevideo.PeVideoModel(cfg, fast=fast).to(device)
        seen, in_attention = {}, {}  # storage -> bytes; storage -> saved inside an attention op
        state = {"attention": False}

        def pack(t):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
            if state["attention"]:
                in_attention[st.data_ptr()] = st.nbytes()
            return t

        def counting(method):
            def run(self, *a, **kw):
                state["attention"] = True
                try:
                    return method(self, *a, **kw)
                finally:
                    state["attention"] = False
            return run

        for name, method in real.items():
            setattr(dispatch.Ops, name, counting(method))
        try:
            import warnings

            with warnings.catch_warnings(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                warnings.simplefilter("ignore")
                model.get_video_features(pixels, mask).pooler_output.sum()
        finally:
            for name, method in real.items():
                setattr(dispatch.Ops, name, method)
        total = sum(seen.values())
        attn = in_attention
        key = "fast" if fast else "eager"
        out[f"{key}_mb"] = total / 1e6
        out[f"attention_{key}_mb"] = sum(attn.values()) / 1e6
        out[f"{key}_report"] = pevideo.kernel_report(model)
    return out


def main_backward(args, fwd) -> int:
    providers = [x for x in (args.providers or ",".join(BWD_PROVIDERS)).split(",") if x]
    unknown = set(providers) - set(BWD_PROVIDERS)
    if unknown:
        print(f"bench_rope_attention --backward: unknown providers {sorted(unknown)}; choose from {list(BWD_PROVIDERS)}")
        return 2
    if not torch.cuda.is_available():
        if not args.smoke:
            print("bench_rope_attention --backward: no CUDA device here; nothing to time (pass --smoke for a CPU "
                  "check of the gradients and the memory saved for the backward).")
            return 0
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before pevideo_kernels is imported
        ok = True
        for c in fwd.build_cases(True, "cpu", torch.float32, smoke=True):
            res = run_case_backward(c, providers if args.providers else ["pevideo", "torch"], True, fwd, time_it=False)
            print_case_backward(res)
            ok &= all((e["status"] == "ok" and e["grad_err_max"] < 1e-4) or e["status"].startswith("unavailable")
                      for e in res["providers"].values())
        mem = tower_step_memory("cpu")
        print(f"\ntower training step (CPU, interpreter), bytes saved for the backward: fast {mem['fast_mb']:.2f} MB, "
              f"eager {mem['eager_mb']:.2f} MB; attention ops alone: fast {mem['attention_fast_mb']:.2f} MB, "
              f"eager {mem['attention_eager_mb']:.2f} MB")
        print("\nsmoke:", "ok" if ok else "FAILED")
        return 0 if ok else 1

    info = fwd.machine_info()
    print("machine:", json.dumps(info))
    cases = fwd.build_cases(args.quick, "cuda", torch.bfloat16)
    if args.cases:
        keep = set(args.cases.split(","))
        cases = [c for c in cases if c.name in keep]
    results = []
    for c in cases:
        res = run_case_backward(c, providers, args.quick, fwd)
        print_case_backward(res)
        results.append(res)
        torch.cuda.empty_cache()
    mem = tower_step_memory("cuda", frames=8)
    print(f"\ntower training step, bytes saved for the backward: fast {mem['fast_mb']:.1f} MB, eager {mem['eager_mb']:.1f} MB")
    if args.out:
        from pevideo.benchtools import machine_slug, write_json

        path = args.out
        if path == "auto":
            path = os.path.join("bench", "results", f"{machine_slug(info)}-rope_attention_backward.json")
        print("wrote", write_json(path, {"machine": info, "quick": args.quick, "results": results, "tower": mem}))
    return 0
