"""The ``pevideo`` command line: ``pevideo bench`` (and the embedding tools).

Everything heavy (torch, transformers) is imported inside :func:`main`, so a Ctrl-C at any point of
the start-up is exit 130 with one line, as it is later in a run.
"""
from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    from .embed.cli import EXIT_STATUS

    parser = argparse.ArgumentParser(prog="pevideo", description="Fast PE Video inference.", epilog=EXIT_STATUS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    from . import bench

    p = sub.add_parser("bench", help="time the video tower: pevideo fast / eager vs transformers",
                       description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(p)
    p.set_defaults(func=bench.main)

    from . import tiny

    p = sub.add_parser("tiny-checkpoint", help="write a small random-weight checkpoint (and a sample clip) to try pevideo offline",
                       description=tiny.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tiny.add_arguments(p)
    p.set_defaults(func=tiny.main)

    from .embed import cli as embed_cli

    embed_cli.register(sub)  # embed, classify, merge
    from . import search_cli

    search_cli.register(sub)  # search
    return parser


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # during start-up (imports, argument parsing); later each command says it
        cmd = getattr(args, "command", None)
        print(f"pevideo{' ' + cmd if cmd else ''}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
