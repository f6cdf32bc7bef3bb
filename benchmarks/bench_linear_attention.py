"""Linear attention with RoPE (paper sec. 3.3) against softmax attention as the sequence grows.

One self-attention layer (hidden 512, 8 heads, batch 1), forward only, RoPE on, lengths 1k..16k. Softmax runs
through SDPA (torch's fused kernel, memory O(T) but time O(T^2)) and eager (the T x T matrix in memory);
linear attention is O(T) in both. Every (kind, length) runs in a fresh subprocess so the peak-memory column is
that process's own high-water mark (ru_maxrss) minus what it held before the forward. Not part of the tests.

    python benchmarks/bench_linear_attention.py                # 1k..16k (a few minutes on 2 CPU cores)
    python benchmarks/bench_linear_attention.py --quick        # 256..1024, seconds
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

KINDS = ["softmax-sdpa", "softmax-eager", "linear-elu", "linear-favor"]
EAGER_LIMIT = 8192  # the T x T float32 scores of 8 heads at 16k would take 8 GiB


def measure(kind: str, length: int, repeats: int) -> dict:
    import torch

    from roformer.config import ModelConfig
    from roformer.linear_attention import ATTENTION_KINDS
    from roformer.positions import RotaryPositions

    attention, impl = kind.split("-")
    cfg = ModelConfig(
        hidden_size=512,
        num_heads=8,
        attention=attention if attention == "linear" else "softmax",
        attention_impl=impl if impl in ("sdpa", "eager") else "sdpa",
        linear_feature_map=impl if impl in ("elu", "favor") else "elu",
        attention_dropout=0.0,
    )
    layer = ATTENTION_KINDS[cfg.attention](cfg).eval()
    x = torch.randn(1, length, 512)
    rope = RotaryPositions(cfg).rope(torch.arange(length))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with torch.no_grad():
        layer(x, None, rope)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            layer(x, None, rope)
        seconds = (time.perf_counter() - start) / repeats
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"kind": kind, "length": length, "ms": seconds * 1000, "peak_mb": peak - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--kinds", nargs="+", default=KINDS, choices=KINDS)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="lengths 256..1024")
    parser.add_argument("--one", nargs=2, metavar=("KIND", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.repeats)))
        return
    lengths = [256, 512, 1024] if args.quick else args.lengths
    results = {}
    for kind in args.kinds:
        for length in lengths:
            if kind == "softmax-eager" and length > EAGER_LIMIT:
                continue
            done = subprocess.run(
                [sys.executable, __file__, "--one", kind, str(length), "--repeats", str(args.repeats)],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                print(f"{kind} at {length}: failed\n{done.stderr[-500:]}", file=sys.stderr)
                continue
            results[kind, length] = json.loads(done.stdout.strip().splitlines()[-1])
    print("\nOne self-attention layer with RoPE, hidden 512, 8 heads, batch 1, forward; time in ms (peak MiB)\n")
    print("| length | " + " | ".join(args.kinds) + " |")
    print("|---|" + "---|" * len(args.kinds))
    for length in lengths:
        cells = []
        for kind in args.kinds:
            r = results.get((kind, length))
            cells.append("-" if r is None else f"{r['ms']:.0f} ({r['peak_mb']:.0f})")
        print(f"| {length} | " + " | ".join(cells) + " |")
    print(
        "\ngrowth from the shortest to the longest length (time ratio; linear growth = length ratio "
        f"{lengths[-1] // lengths[0]}x):"
    )
    for kind in args.kinds:
        ends = [results.get((kind, n)) for n in (lengths[0], lengths[-1])]
        if all(ends):
            print(f"  {kind}: {ends[1]['ms'] / ends[0]['ms']:.1f}x")


if __name__ == "__main__":
    main()
