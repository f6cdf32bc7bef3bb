"""What a translation run does with WMT14-size prepared lengths before its first step: filter, sort, cut into
token batches, order an epoch. Synthetic lengths for 4.5M pairs (log-normal sources around 25 BPE tokens, targets
about 1.1x), the paper recipe's limits (256 tokens, ratio 1.5) and 4096-token batches. Not part of the tests.

    python benchmarks/bench_translation_batches.py              # 4.5M pairs
    python benchmarks/bench_translation_batches.py --loop       # also the previous per-pair Python loop
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from roformer.config import TranslationDataConfig
from roformer.tasks.translation import keep_pairs, length_sorted, token_batches


def loop_batches(order: np.ndarray, sizes: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """The per-pair loop token_batches replaced (the same cut)."""
    batches, start, longest = [], 0, 0
    for pos, i in enumerate(order):
        grown = max(longest, int(sizes[i]))
        if pos > start and grown * (pos - start + 1) > max_tokens:
            batches.append(order[start:pos])
            start, grown = pos, int(sizes[i])
        longest = grown
    if len(order) > start:
        batches.append(order[start:])
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4_500_000)
    parser.add_argument("--max_tokens", type=int, default=4096)
    parser.add_argument("--loop", action="store_true", help="also time the per-pair Python loop")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    src = np.clip(rng.lognormal(3.2, 0.6, args.pairs).astype(np.int64), 1, 400) + 1  # + EOS
    tgt = np.clip((src * rng.normal(1.1, 0.15, args.pairs)).astype(np.int64), 1, 400) + 1
    data = TranslationDataConfig()
    times = {}
    start = time.perf_counter()
    keep = keep_pairs(src, tgt, data)
    times["keep_pairs"] = time.perf_counter() - start
    start = time.perf_counter()
    order = keep[length_sorted(src[keep], tgt[keep], 42)]
    times["length_sorted"] = time.perf_counter() - start
    start = time.perf_counter()
    sizes = np.maximum(src, tgt)
    batches = token_batches(order, sizes, args.max_tokens)
    times["token_batches"] = time.perf_counter() - start
    start = time.perf_counter()
    permutation = np.random.default_rng([42, 0]).permutation(len(batches))
    _ = [batches[i] for i in permutation]
    times["epoch order"] = time.perf_counter() - start
    print(f"{args.pairs:,} pairs, {len(keep):,} kept, {len(batches):,} batches of <= {args.max_tokens} tokens")
    print(
        "  ".join(f"{name} {seconds:.2f} s" for name, seconds in times.items()), f" total {sum(times.values()):.2f} s"
    )
    if args.loop:
        start = time.perf_counter()
        same = loop_batches(order, sizes, args.max_tokens)
        seconds = time.perf_counter() - start
        equal = len(same) == len(batches) and all(np.array_equal(a, b) for a, b in zip(same, batches))
        print(f"per-pair loop: {seconds:.2f} s ({'same' if equal else 'DIFFERENT'} batches)")


if __name__ == "__main__":
    main()
