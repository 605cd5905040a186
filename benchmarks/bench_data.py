"""Throughput of the embedded ``shapes`` dataset on one CPU core (issue target: >= 20,000 images/s).

Prints images/s and writes nothing. Two numbers per measurement: the best of the repeats (the
usual timeit convention: the least disturbed run on a shared machine) and the median.

    python benchmarks/bench_data.py                 # generation, then the training-batch loader
    python benchmarks/bench_data.py --images 16384 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kdlib.data import SHAPES_MEAN, SHAPES_STD, TensorBatches, generate_shapes


def measure(fn, images: int, repeats: int) -> tuple[float, float]:
    """(best, median) images per second of ``fn`` over ``repeats`` timed calls after one warm-up."""
    fn()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        rates.append(images / (time.perf_counter() - start))
    return max(rates), statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8192, help="images per timed call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the target is for 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")

    best, median = measure(lambda: generate_shapes(range(args.images), seed=0), args.images, args.repeats)
    print(f"shapes generation: {best:,.0f} images/s (best of {args.repeats}), {median:,.0f} median")

    images, labels, _, _ = generate_shapes(range(args.images), seed=0)
    batches = TensorBatches(images, labels, 128, SHAPES_MEAN, SHAPES_STD, train=True, seed=0)

    def one_epoch() -> None:
        batches.set_epoch(batches.epoch + 1)
        for _ in batches:
            pass

    best, median = measure(one_epoch, args.images, args.repeats)
    print(f"shapes training batches (crop + flip + normalise, batch 128): {best:,.0f} images/s "
          f"(best of {args.repeats}), {median:,.0f} median")


if __name__ == "__main__":
    main()
