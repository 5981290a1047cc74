"""The ``pevideo`` command line: ``pevideo bench`` (and the embedding tools).

Everything heavy (torch, transformers) is imported inside :func:`main`, its compiled libraries with
Ctrl-C held back, so a Ctrl-C at any point of the start-up is exit 130 with one line, as it is later in
a run.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import threading

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


# The compiled libraries a command starts by importing. A Ctrl-C that lands inside one's initialization
# can leave it half made (numpy then refuses to load again, an exit can hang), so start-up imports them
# with Ctrl-C held back, and says "interrupted" once they are in.
_START_UP = ("numpy", "torch", "safetensors", "av")


@contextlib.contextmanager
def _interrupt_held(held: list):
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def main(argv: list[str] | None = None) -> int:
    args = None
    held: list = []
    try:
        with _interrupt_held(held):
            for name in _START_UP:
                try:
                    importlib.import_module(name)
                except ImportError:  # PyAV is optional until a video is decoded
                    pass
            parser = build_parser()
        if held:
            raise KeyboardInterrupt
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # during start-up (imports, argument parsing); later each command says it
        cmd = getattr(args, "command", None)
        print(f"pevideo{' ' + cmd if cmd else ''}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
