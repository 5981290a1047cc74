"""clips/s of pevideo (eager, and fast on a GPU) against transformers on the same random weights.

Full batches and a batch of unequal clip lengths (16, 8, 4, 2 frames padded to 16: 30 of 64 frames
real). On CPU a small configuration; on a GPU the pe-av-large video tower. The code lives in
``pevideo.bench`` (the ``pevideo bench`` console script); this script only picks the issue's batch:

    python bench/bench_model.py [--device cuda] [--out bench/results]
"""
import argparse
import sys

from pevideo import bench


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(p)
    p.set_defaults(unequal="16,8,4,2", clips=4, out="bench/results", tag="bench_model")
    return bench.main(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
