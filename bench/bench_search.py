"""Retrieval: exact top-k (``pevideo.search``) and the FAISS index against it, on a synthetic set.

The set: ``--n`` embeddings of ``--dim`` float32 on a random ``--latent``-dimensional subspace plus
noise (a continuum of neighbours, as real embeddings have; ``--data clusters`` draws tight clusters
instead, which any index finds easily), and ``--queries`` new points drawn the same way. Reported:

* exact search, one query and a batch of queries, chunked (``--chunk-size`` rows at a time): ms, rows/s,
  useful GFLOP/s (2·Q·N·D multiply-adds of the scores) and GB/s (the N·D·4 bytes read), beside their
  floors (FLOPs / this machine's measured float32 matmul rate, bytes / its measured copy bandwidth);
* the FAISS index (``--factory``, default IVF with ``--nlist`` cells holding the rows in float16,
  half of float32's memory): train and add times, then per
  ``--nprobe`` value its query time and recall@k against the exact search (share of the exact top-k
  the index returns, averaged over the queries).

    python bench/bench_search.py --out bench/results/cpu-search.json         # 1M x 1024, a few minutes on 2 cores
    python bench/bench_search.py --n 20000 --dim 64 --nlist 64 --queries 10   # a smoke run
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

from pevideo.benchtools import machine_info, time_fn, write_json


def synthetic(kind: str, n: int, dim: int, clusters: int, latent: int, noise: float, queries: int, seed: int = 0):
    """``clusters``: points around random centres (neighbours are a cluster's members: easy for an index).
    ``latent``: points on a random ``latent``-dimensional subspace plus noise, a continuum of neighbours
    as embeddings of real videos have (the harder case, the default)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "clusters":
        centres = torch.randn(clusters, dim, generator=g) / dim**0.5

        def draw(m):
            return centres[torch.randint(0, clusters, (m,), generator=g)] + noise / dim**0.5 * torch.randn(m, dim, generator=g)
    else:
        basis = torch.randn(latent, dim, generator=g) / dim**0.5

        def draw(m):
            return torch.randn(m, latent, generator=g) @ basis / latent**0.5 + noise / dim**0.5 * torch.randn(m, dim, generator=g)
    x = torch.empty(n, dim)
    for a in range(0, n, 65536):  # in pieces: no n x dim temporaries beside x
        x[a : min(n, a + 65536)] = draw(min(n, a + 65536) - a)
    return x, draw(queries)


def floors() -> dict:
    """This machine's float32 matmul rate and copy bandwidth, measured (the floors' denominators)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    t = time_fn(lambda: a @ b, warmup=1, repeats=5).min_s
    src = torch.randn(64 << 20 >> 2)  # 64 MiB
    dst = torch.empty_like(src)
    c = time_fn(lambda: dst.copy_(src), warmup=1, repeats=5).min_s
    return {"matmul_gflops": 2 * 2048**3 / t / 1e9, "copy_gbs": 2 * src.numel() * 4 / c / 1e9}


def recall(approx: torch.Tensor, exact: torch.Tensor) -> float:
    k = exact.shape[1]
    return float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approx.tolist(), exact.tolist())]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--data", choices=["latent", "clusters"], default="latent")
    ap.add_argument("--latent", type=int, default=32, help="--data latent: the subspace's dimension")
    ap.add_argument("--clusters", type=int, default=1000, help="--data clusters: how many")
    ap.add_argument("--noise", type=float, default=0.5, help="noise beside the structure (1 = as large)")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--chunk-size", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--nlist", type=int, default=1024, help="IVF cells (the default factory IVF<nlist>,SQfp16)")
    ap.add_argument("--factory", default=None, help="a FAISS factory string instead (IVF<nlist>,Flat stores the "
                    "rows as float32: 4 GiB at 1M x 1024; SQfp16 half that, SQ8 a quarter)")
    ap.add_argument("--train-rows", type=int, default=None, help="rows to train on (default 40 per cell)")
    ap.add_argument("--nprobe", default="1,8,32,128", help="cells searched per query, comma-separated")
    ap.add_argument("--no-faiss", action="store_true")
    ap.add_argument("--out", default=None, help="JSON results (e.g. bench/results/cpu-search.json)")
    args = ap.parse_args(argv)

    import pevideo

    machine = machine_info("cpu")
    print(f"machine: {machine['label']}, torch threads {torch.get_num_threads()}", file=sys.stderr)
    t0 = time.perf_counter()
    x, q = synthetic(args.data, args.n, args.dim, args.clusters, args.latent, args.noise, args.queries)
    print(f"data: {args.n} x {args.dim} float32 ({x.numel() * 4 / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
    fl = floors()
    report = {"benchmark": "search", "n": args.n, "dim": args.dim, "data": args.data,
              "latent" if args.data == "latent" else "clusters": args.latent if args.data == "latent" else args.clusters,
              "noise": args.noise,
              "queries": args.queries, "k": args.k, "chunk_size": args.chunk_size, "floors": fl, "exact": {}}

    exact = None
    for nq in sorted({1, args.queries}):
        qq = q[:nq]
        res = {}
        t = time_fn(lambda qq=qq: res.__setitem__("r", pevideo.search(x, qq, args.k, chunk_size=args.chunk_size,
                                                                       device="cpu")),
                    warmup=1, repeats=args.repeats)
        flops, nbytes = 2.0 * nq * args.n * args.dim, args.n * args.dim * 4.0
        row = {**t.as_dict(), "rows_per_s": args.n / t.median_s, "useful_gflops": flops / t.median_s / 1e9,
               "gbs": nbytes / t.median_s / 1e9, "floor_ms": 1e3 * max(flops / (fl["matmul_gflops"] * 1e9),
                                                                       nbytes / (fl["copy_gbs"] * 1e9))}
        report["exact"][f"q{nq}"] = row
        print(f"exact, {nq} queries: {row['ms_median']:.0f} ms ({row['rows_per_s'] / 1e6:.2f} M rows/s, "
              f"{row['useful_gflops']:.1f} GFLOP/s, {row['gbs']:.2f} GB/s; floor {row['floor_ms']:.0f} ms)", file=sys.stderr)
        if nq == args.queries:
            exact = res["r"]

    if not args.no_faiss:
        from pevideo.retrieval_faiss import FaissIndex

        factory = args.factory or f"IVF{args.nlist},SQfp16"
        t1 = time.perf_counter()
        index = FaissIndex.build(x, factory=factory, train_rows=args.train_rows or 40 * args.nlist,
                                 chunk_size=args.chunk_size)
        build_s = time.perf_counter() - t1
        report["faiss"] = {"factory": factory, "train_rows": args.train_rows or 40 * args.nlist, "build_s": build_s,
                           "nprobe": {}}
        print(f"faiss {factory}: built in {build_s:.1f} s", file=sys.stderr)
        for p in [int(v) for v in args.nprobe.split(",")]:
            index.nprobe = p
            res = {}
            t = time_fn(lambda: res.__setitem__("r", pevideo.search(x, q, args.k, index=index)), warmup=1,
                        repeats=args.repeats)
            r = recall(res["r"].indices, exact.indices)
            row = {**t.as_dict(), f"recall_at_{args.k}": r,
                   "speedup_vs_exact": report["exact"][f"q{args.queries}"]["ms_median"] / (1e3 * t.median_s)}
            report["faiss"]["nprobe"][str(p)] = row
            print(f"  nprobe {p}: {row['ms_median']:.1f} ms for {args.queries} queries, recall@{args.k} {r:.3f} "
                  f"({row['speedup_vs_exact']:.0f}x the exact search)", file=sys.stderr)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        print(write_json(args.out, report, machine_info("cpu")), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
