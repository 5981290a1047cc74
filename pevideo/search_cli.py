"""``pevideo search``: the top-k videos of an embeddings output for text or video queries.

Text queries go through the text tower exactly as ``pevideo classify`` sends its labels
(:func:`pevideo.embed.api.text_embeddings`), video queries through ``pevideo embed``'s pipeline with the
sampling the embeddings were made with; the model must be the one that made the embeddings (checked
against the run's fingerprint). Output: a table, or CSV / JSON (``--format`` or ``--out``'s suffix),
as ``classify`` writes them. Exit status as the other subcommands (2: usage, 3: a damaged file).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import warnings

from .embed.tables import path_cell, printable

__all__ = ["register", "run_search"]

EPILOG = """\
examples:
  pevideo search emb.safetensors --text "a person playing tennis" --model facebook/pe-av-large
  pevideo search emb/ --video query.mp4 -k 20 --model facebook/pe-av-large --out hits.csv
  pevideo search emb.safetensors --text "a cat sleeping" "a dog running" --score probability --model ckpt --format json
"""


def register(sub) -> None:
    from .embed.cli import EXIT_STATUS
    from .retrieval import DEFAULT_CHUNK

    p = sub.add_parser("search", help="top-k videos of an embeddings output for text or video queries",
                       description="Rank the videos of EMBEDDINGS (what `pevideo embed` wrote: X.safetensors, a "
                       "folder of shards, or the Parquet folder of --engine ray) by cosine similarity to each "
                       "query (or by the model's probability, as classify computes it). Exact, a chunk of rows "
                       "at a time (memory bounded by --chunk-size), on the GPU when there is one.",
                       epilog=EPILOG + "\n" + EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("embeddings", metavar="EMBEDDINGS", help="the output of `pevideo embed`")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--text", nargs="+", help='text queries, e.g. "a person playing tennis"')
    g.add_argument("--video", nargs="+", help="video queries (embedded with the embeddings' own sampling)")
    p.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    p.add_argument("--model", required=True, help="the checkpoint the embeddings were made with (folder or Hub id)")
    p.add_argument("--score", choices=["cosine", "probability"], default="cosine",
                   help="cosine (default), or probability: sigmoid(text . video * scale + bias), as classify")
    p.add_argument("--index", default=None, help="a FAISS index of these embeddings (FaissIndex.build(...)"
                   ".save(FILE); pip install 'pevideo[faiss]'): approximate, instead of the exact scan")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK,
                   help=f"rows scored at a time, the memory bound (default {DEFAULT_CHUNK})")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32"],
                   help="the model's dtype for the queries (default: bf16 on a GPU, fp32 on CPU, as classify)")
    p.add_argument("--format", choices=["text", "csv", "json"], default=None,
                   help="output format (default: from --out's suffix, else text)")
    p.add_argument("--out", default=None, help="write here instead of stdout (temporary name, then renamed)")
    p.set_defaults(func=run_search)


def check_same_model(config: dict, session, where: str) -> None:
    """Refuse a model other than the one that made the embeddings (its config.json or weight files differ)."""
    from .embed.fingerprint import model_id
    from .errors import UsageError

    want = config.get("model") if isinstance(config, dict) else None
    if not isinstance(want, dict):
        warnings.warn(f"{where} does not record its model (no manifest): the model is not checked", stacklevel=2)
        return
    have = model_id(session.source)
    diff = [f"its {k}" for k in ("config_sha256", "weights") if k in want and k in have and want[k] != have[k]]
    if diff:
        raise UsageError(f"{where} was made with another model than {session.checkpoint or session.source} "
                         f"({' and '.join(d.replace('config_sha256', 'config.json') for d in diff)} differ); "
                         "give --model the checkpoint the embeddings were made with")


def _query_videos(args, session, config):
    from .embed.api import embed_videos
    from .embed.inputs import expand_inputs
    from .errors import UsageError

    num_frames, fps = config.get("num_frames"), config.get("fps")
    if num_frames is None and fps is None:
        num_frames = 16
    paths = expand_inputs(args.video, must_exist=True)
    results = list(embed_videos(paths, session.model(), processor=session.processor, num_frames=num_frames, fps=fps,
                                num_workers=0, apply_rotation=bool(config.get("apply_rotation", False))))
    bad = [r for r in results if not r.ok]
    if bad:
        raise UsageError(f"query video {bad[0].error if bad[0].path in bad[0].error else bad[0].path + ': ' + bad[0].error}")
    import torch

    return torch.stack([r.video_embeds for r in results]), [r.path for r in results]


def run_search(args: argparse.Namespace) -> int:
    from .embed.cli import _guarded, check_device
    from .embed.inputs import expand_inputs
    from .embed.layout import check_table_path
    from .embed.session import checkpoint_folder, model_source
    from .embed.tables import TableOutput, table_format

    def go():
        from .embed.api import text_embeddings
        from .embed.session import open_session
        from .errors import UsageError
        from .processing import load_tokenizer
        from .retrieval import open_embeddings, search

        fmt = table_format(args.format, args.out)
        if args.k < 1 or args.chunk_size < 1:
            raise UsageError("-k and --chunk-size must be >= 1")
        if args.video and args.score == "probability":
            raise UsageError("--score probability is the text-video probability: it needs --text")
        check_device(args.device)
        if args.out:  # before anything is loaded: never over an input, the checkpoint or a user's file
            inputs = [args.embeddings, *(expand_inputs(args.video, must_exist=True) if args.video else [])]
            check_table_path(args.out, inputs=inputs, checkpoint=checkpoint_folder(model_source(args.model)),
                             owned=is_search_table)
        with TableOutput(args.out) as out:
            source = open_embeddings(args.embeddings)
            index = None
            if args.index:
                from .retrieval_faiss import FaissIndex

                index = FaissIndex.load(args.index)
            session = open_session(args.model, None, device=args.device, dtype=args.dtype)
            check_same_model(source.config, session, args.embeddings)
            model = session.model()
            if args.text:
                if session.checkpoint is None:
                    raise UsageError("text queries need the checkpoint's tokenizer (a checkpoint folder)")
                queries, names = text_embeddings(model, load_tokenizer(session.checkpoint), args.text), list(args.text)
            else:
                queries, names = _query_videos(args, session, source.config)
            scale = float(model.text_video_logit_scale.float().item())
            bias = float(model.text_video_logit_bias.float().item())
            res = search(source, queries, args.k, score=args.score, logit_scale=scale, logit_bias=bias,
                         chunk_size=args.chunk_size, device=session.device, index=index)
            out.commit({"text": _as_text, "csv": _as_csv, "json": _as_json}[fmt](names, res, to_file=out.to_file))
        return 0

    return _guarded("search", go, where=args.embeddings)


def _hits(res, q):
    for rank, (i, ii, p, s) in enumerate(zip(res.indices[q].tolist(), res.input_index[q].tolist(), res.paths[q],
                                             res.scores[q].tolist()), 1):
        if i >= 0:
            yield rank, i, ii, p, s


TEXT_MARK = "# pevideo search"  # first line of a text table written to a file: proves it pevideo's
_CSV_HEAD = "query,rank,index,input_index,path,"


def is_search_table(path: str) -> bool:
    """A table ``pevideo search`` wrote (its text table with the mark, its CSV header or its JSON)."""
    try:
        with open(path, encoding="utf-8") as f:
            head = f.readline().rstrip("\n")
            if head == TEXT_MARK or head.startswith(_CSV_HEAD):
                return True
            if head.strip() != "{":
                return False
            f.seek(0)
            data = json.load(f)
        return isinstance(data, dict) and set(data) == {"score", "k", "queries"}
    except (ValueError, UnicodeDecodeError):
        return False


def _as_text(names, res, to_file: bool = False) -> str:
    lines = [TEXT_MARK] if to_file else []
    for q, name in enumerate(names):
        lines.append(f"{printable(name)}  ({res.score})")
        lines += [f"  {rank:>3}  {s:.4f}  {path_cell(p)}" for rank, _, _, p, s in _hits(res, q)]
    return "\n".join(lines) + "\n"


def _as_csv(names, res, to_file: bool = False) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["query", "rank", "index", "input_index", "path", res.score])
    for q, name in enumerate(names):
        for rank, i, ii, p, s in _hits(res, q):
            w.writerow([path_cell(name), rank, i, ii, path_cell(p), f"{s:.6g}"])
    return buf.getvalue()


def _as_json(names, res, to_file: bool = False) -> str:
    rows = [{"query": name, "results": [{"rank": rank, "index": i, "input_index": ii, "path": p, "score": round(s, 6)}
                                        for rank, i, ii, p, s in _hits(res, q)]} for q, name in enumerate(names)]
    return json.dumps({"score": res.score, "k": int(res.indices.shape[1]) if res.indices.dim() == 2 else 0,
                       "queries": rows}, indent=2) + "\n"
