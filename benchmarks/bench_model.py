"""Training-step throughput and peak memory: our RoFormerForMaskedLM per position scheme vs transformers.

Every position scheme (rotary, sinusoidal, learned, alibi, t5_relative, none) is measured, and each is also
reported as a ratio to `none`, the cost of its positions alone.

One masked-LM training step (forward, backward, AdamW) at equal size, 15% of the tokens labelled (-100
elsewhere), dropout 0.1 everywhere, as in BERT/RoFormer pretraining. Every (size, model) pair runs in a
fresh subprocess, so peak memory is that process's high-water mark (ru_maxrss on CPU, max_memory_allocated
on CUDA) minus what it held before building the model. Not part of the test suite.

    python benchmarks/bench_model.py                      # both sizes, all models (a few minutes on CPU)
    python benchmarks/bench_model.py --quick              # a tiny size, seconds: checks the script runs
    python benchmarks/bench_model.py --sizes base --models rotary none hf-roformer --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

SIZES = {
    # name: (layers, hidden, heads, ffn, vocab, batch, seq_len)
    "base": (6, 512, 8, 2048, 30522, 8, 512),
    "long": (6, 512, 8, 2048, 30522, 1, 4096),
    "quick": (2, 128, 4, 512, 30522, 4, 128),
    # BERT-base, for GPUs (make gpu-check): large batches, as pretraining runs them
    "bert-base-128": (12, 768, 12, 3072, 30522, 128, 128),
    "bert-base-512": (12, 768, 12, 3072, 30522, 32, 512),
}
OURS = [
    "rotary",
    "sinusoidal",
    "learned",
    "alibi",
    "t5_relative",
    "none",
]  # position schemes (roformer.POSITION_SCHEMES)
THEIRS = ["hf-roformer", "hf-bert"]
REFERENCE = "hf-roformer"


# --------------------------------------------------------------------------------------------------
# One measurement, in its own process
# --------------------------------------------------------------------------------------------------


def _rss_mb() -> float:
    """This process's peak resident set so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024**2 if platform.system() == "Darwin" else peak / 1024


def _build(model_name: str, size: str, attention_dropout: float):
    import torch

    layers, hidden, heads, ffn, vocab, _, seq_len = SIZES[size]
    max_positions = max(512, seq_len)
    if model_name in OURS:
        import roformer

        cfg = roformer.ModelConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            intermediate_size=ffn,
            max_position_embeddings=max_positions,
            position=model_name,
            attention_dropout=attention_dropout,
        )
        return roformer.RoFormerForMaskedLM(cfg), "sdpa"
    import transformers

    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=max_positions,
        attention_probs_dropout_prob=attention_dropout,
    )
    if model_name == "hf-roformer":
        config, cls = transformers.RoFormerConfig(**common, embedding_size=hidden), transformers.RoFormerForMaskedLM
    else:
        config, cls = transformers.BertConfig(**common), transformers.BertForMaskedLM
    impl = "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"  # RoFormer has no SDPA path
    config._attn_implementation = impl
    model = cls(config)
    assert model.config._attn_implementation == impl
    del torch
    return model, impl


def measure(
    model_name: str,
    size: str,
    steps: int,
    warmup: int,
    device: str,
    threads: int | None,
    attention_dropout: float,
    dtype: str = "fp32",
) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)

    if model_name not in OURS:
        import transformers  # noqa: F401  (imported before the baseline, as ours imports roformer there)
    import roformer  # noqa: F401

    _, _, _, _, vocab, batch, seq_len = SIZES[size]
    torch.manual_seed(0)
    input_ids = torch.randint(5, vocab, (batch, seq_len), device=device)
    attention_mask = torch.ones_like(input_ids)
    masked = torch.rand(batch, seq_len, device=device) < 0.15
    labels = torch.where(masked, input_ids, torch.full_like(input_ids, -100))

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated() / 1024**2
    else:
        baseline = _rss_mb()

    model, impl = _build(model_name, size, attention_dropout)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bf16")

    if model_name in OURS:  # what our trainer gives it for packed blocks: no mask, the loader's masked-token bound
        inputs = dict(input_ids=input_ids, labels=labels, masked_width=int(masked.sum(1).max()))
    else:  # transformers' models as a user calls them (BERT's sdpa drops an all-ones mask itself)
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def step() -> float:
        with autocast:
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # synchronises

    for _ in range(warmup):
        step()
    wall, cpu = [], []
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = step()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    peak = torch.cuda.max_memory_allocated() / 1024**2 if cuda else _rss_mb()
    from roformer.config import ModelConfig
    from roformer.flops import device_peak_flops, mlm_training_flops_per_token

    layers, hidden, heads, ffn = SIZES[size][:4]
    shape = ModelConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=ffn)
    peak_flops = device_peak_flops(torch.cuda.get_device_name(device)) if cuda else None
    return {
        "flops_per_token": mlm_training_flops_per_token(shape, seq_len, 0.15),  # the trainer's train/mfu count
        "peak_flops": peak_flops,
        "dtype": dtype,
        "model": model_name,
        "size": size,
        "attention": impl,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "tokens_per_step": batch * seq_len,
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_mb": peak - baseline,
        "loss": loss,
        "threads": torch.get_num_threads(),
    }


def run_in_subprocess(model_name: str, size: str, args) -> dict:
    command = [sys.executable, __file__, "--worker", model_name, size, "--steps", str(args.steps)]
    command += ["--warmup", str(args.warmup), "--device", args.device, "--dtype", args.dtype]
    command += ["--attention-dropout", str(args.attention_dropout)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"model": model_name, "size": size, "error": f"exit {done.returncode}: {tail[0][:120]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def summarise(runs: list[dict]) -> dict:
    """Merge the rounds of one (size, model): every timed step pooled, the highest memory peak."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    wall = [t for r in ok for t in r["wall_s"]]
    cpu = [t for r in ok for t in r["cpu_s"]]
    return {
        **ok[0],
        "steps": len(wall),
        "best_s": min(wall),
        "median_s": _median(wall),
        "cpu_s": _median(cpu),
        "tokens_per_s": ok[0]["tokens_per_step"] / min(wall),
        "peak_mb": max(r["peak_mb"] for r in ok),
    }


def print_table(results: list[dict]) -> None:
    header = (
        f"{'size':<13} {'model':<12} {'attn':<6} {'params':>7} {'best s':>7} {'median s':>8} {'cpu s':>7} "
        f"{'tokens/s':>9} {'vs hf-rof':>9} {'MFU':>6} {'peak MiB':>9} {'mem vs hf':>9} {'loss':>6}"
    )
    print(header)
    print("-" * len(header))
    for size in dict.fromkeys(r["size"] for r in results):
        rows = [r for r in results if r["size"] == size]
        ref = next((r for r in rows if r["model"] == REFERENCE and "error" not in r), None)
        for r in rows:
            if "error" in r:
                print(f"{size:<13} {r['model']:<12} {r['error']}")
                continue
            speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
            memory = f"{r['peak_mb'] / ref['peak_mb']:.2f}x" if ref and ref["peak_mb"] > 0 else "-"
            peak_flops = r.get("peak_flops")
            mfu = f"{r['flops_per_token'] * r['tokens_per_s'] / peak_flops:.1%}" if peak_flops else "-"
            print(
                f"{size:<13} {r['model']:<12} {r['attention']:<6} {r['params_m']:>6.1f}M {r['best_s']:>7.2f} "
                f"{r['median_s']:>8.2f} {r['cpu_s']:>7.2f} {r['tokens_per_s']:>9.0f} {speed:>9} {mfu:>6} "
                f"{r['peak_mb']:>9.0f} {memory:>9} {r['loss']:>6.2f}"
            )
        by_name = {r["model"]: r for r in rows if "error" not in r}
        if "none" in by_name:  # what each scheme costs over no positions at all, measured in the same run
            none = by_name["none"]
            for name in (n for n in OURS if n in by_name and n != "none"):
                r = by_name[name]
                print(
                    f"{size:<6} {name} vs none: {r['tokens_per_s'] / none['tokens_per_s']:.2f}x tokens/s (best step), "
                    f"{r['cpu_s'] / none['cpu_s'] - 1:+.1%} CPU time"
                )
        print()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["base", "long"])
    parser.add_argument("--models", nargs="+", choices=OURS + THEIRS, default=OURS + THEIRS)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat every model this often, interleaved (a shared machine is noisy)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, fp32 weights")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument(
        "--attention-dropout", type=float, default=0.1, help="dropout on attention weights, the same for every model"
    )
    parser.add_argument("--quick", action="store_true", help="the tiny 'quick' size, 2 steps after 1 warm-up")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        worker_args = (args.steps, args.warmup, args.device, args.threads, args.attention_dropout, args.dtype)
        print(json.dumps(measure(*args.worker, *worker_args)))
        return
    if args.quick:
        args.sizes, args.steps, args.warmup = ["quick"], 2, 1

    import torch

    threads = args.threads or torch.get_num_threads()
    print(
        f"torch {torch.__version__}, {args.device}, {threads} threads, {os.cpu_count()} CPUs; "
        f"{args.rounds} x ({args.warmup} warm-up + {args.steps} timed) steps of forward + backward + AdamW, "
        f"15% of tokens labelled, dropout 0.1 (attention weights: {args.attention_dropout})"
    )
    for size in args.sizes:
        layers, hidden, heads, ffn, vocab, batch, seq_len = SIZES[size]
        print(f"  {size}: L={layers} H={hidden} heads={heads} FFN={ffn} V={vocab}, batch {batch} x {seq_len} tokens")
    print(
        "tokens/s from the best step; cpu s: median process CPU time per step (less sensitive to other load);\n"
        "peak MiB: growth of the worker's peak RSS from before the model was built (fresh process per run)"
    )
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    runs: dict[tuple[str, str], list[dict]] = {}
    for size in args.sizes:
        for _ in range(args.rounds):
            for model_name in args.models:
                runs.setdefault((size, model_name), []).append(run_in_subprocess(model_name, size, args))
                print(f"  done: {size} {model_name}", file=sys.stderr, flush=True)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"1-minute load average: {load_before:.1f} before, {load_after:.1f} after ({os.cpu_count()} CPUs)\n")
    results = [summarise(r) for r in runs.values()]
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
