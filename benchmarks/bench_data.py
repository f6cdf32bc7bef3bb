"""Data preparation at scale: `roformer prepare` vs transformers' run_mlm recipe, then time to train from it.

For each corpus size, a synthetic corpus is written from the sentences of ../shared/data/text, shuffled with a
fixed seed into paragraphs of 4-24 sentences (one paragraph per line, a blank line between: a document for both
readers), so it is deterministic and not one text repeated. A WordPiece tokenizer is trained once on the source
text and given to both sides, so what is compared is tokenizing, packing and writing. Each side runs as its own
subprocess on the same --num_proc processes:

- ours: `roformer prepare --config configs/pretrain/tiny.yaml data.tokenizer=... data.train_files=[corpus]`;
- anchor: transformers' examples/pytorch/language-modeling/run_mlm.py data path: `load_dataset("text")`, then
  `map(tokenize, batched=True, num_proc=N)` with return_special_tokens_mask and `map(group_texts, num_proc=N)`
  into blocks of the same length, written to its Arrow cache in the work directory.

Measured: MB/s (corpus bytes / wall time of the whole command, interpreter start included); peak memory as the
largest single process's peak RSS (wait4, which covers the workers) and as the peak of the process tree's summed
PSS, sampled 5 times a second (shared pages counted once); CPU seconds per MB (user + system, workers included:
what a machine with more cores divides); disk bytes per token (every byte the command wrote / tokens it
produced). Then, on our prepared data: seconds from launching `roformer pretrain data.prepared=...` to its first
logged step; seconds from launching a resume of a real checkpoint (step --ckpt_steps) to its first new
step; and the same from a copy of that checkpoint whose data position is moved to 90% through the fourth epoch
(the position is all a resume seeks by; model and optimizer are unchanged), i.e. a late step. Not part of the
test suite.

    python benchmarks/bench_data.py --sizes 20MB 100MB --train_threads 1   # on a shared 2-core machine
    python benchmarks/bench_data.py --num_proc 16 --json bench.json   # default sizes 100MB 500MB 2GB
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO.parent / "shared" / "data" / "text"
RECIPE = REPO / "configs" / "pretrain" / "tiny.yaml"
MB = 1e6  # decimal megabytes throughout
TARGETS = {"rss_gb": 2.0, "speedup": 2.0, "bytes_per_token": 2.5, "first_step_s": 30.0, "resume_s": 30.0}
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
TITLE = re.compile(r"^\s*=.*=\s*$")


# --------------------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------------------


def sentences(text_dir: Path) -> list[str]:
    """WikiText's sentences (titles dropped) and Shakespeare's lines: the pool paragraphs are drawn from."""
    pool = []
    for path in sorted(text_dir.glob("*.txt")):
        if path.name == "SOURCE.txt":
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip() and not TITLE.match(line):
                pool.extend(s.strip() for s in SENTENCE_END.split(line.strip()) if s.strip())
    return pool


def write_corpus(path: Path, size: int, seed: int = 0) -> Path:
    """About `size` bytes of paragraphs of 4-24 shuffled sentences, one per line, blank-line separated."""
    if path.is_file() and path.stat().st_size >= size:
        return path  # kept from an earlier run (--keep): the same seed writes the same bytes
    pool, rng = sentences(TEXT), random.Random(seed)
    tmp, written = path.with_name(path.name + ".tmp"), 0
    with open(tmp, "w", encoding="utf-8") as f:
        while written < size:
            rng.shuffle(pool)  # a new order every pass over the pool
            i, lines = 0, []
            while i < len(pool) and written < size:
                n = rng.randint(4, 24)
                paragraph = " ".join(pool[i : i + n]) + "\n\n"
                lines.append(paragraph)
                written += len(paragraph.encode("utf-8"))
                i += n
            f.write("".join(lines))
    os.replace(tmp, path)
    return path


def shared_tokenizer(out: Path, vocab_size: int, block: int) -> Path:
    """One WordPiece tokenizer, trained once on the source text, used by both sides."""
    from roformer.tokenization import train_wordpiece

    if not (out / "tokenizer.json").is_file():
        paragraphs = [p for f in sorted(TEXT.glob("*.txt")) if f.name != "SOURCE.txt"
                      for p in f.read_text(encoding="utf-8").split("\n\n") if p.strip()]  # fmt: skip
        train_wordpiece(paragraphs, vocab_size, block).save_pretrained(out)
    return out


# --------------------------------------------------------------------------------------------------
# Measuring a subprocess
# --------------------------------------------------------------------------------------------------


def tree_pss(pid: int) -> int:
    """Summed PSS of a process and its descendants, in bytes (0 for those gone meanwhile)."""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            with open(f"/proc/{proc.pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            pass
    return total


def run_measured(cmd: list[str], log: Path, timeout: float, env: dict) -> dict:
    """Runs `cmd` to its end: wall seconds, largest single-process peak RSS (its tree, via wait4), peak tree PSS."""
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        peak, done = [0], threading.Event()

        def sample():
            while not done.wait(0.2):
                peak[0] = max(peak[0], tree_pss(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        timer.cancel()
        done.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    if proc.returncode != 0:
        tail = log.read_text()[-2000:]
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}; timeout {timeout:.0f} s):\n{tail}")
    cpu = usage.ru_utime + usage.ru_stime  # of the process and every worker it waited for
    return {"seconds": wall, "cpu_seconds": cpu, "max_rss": usage.ru_maxrss * 1024, "peak_pss": peak[0]}


def seconds_to_step(
    cmd: list[str], metrics: Path, step: int, log: Path, timeout: float, env: dict, finish: bool = False
) -> float:
    """Seconds from launching a training command until metrics.jsonl logs `step`; the run is then stopped (or,
    with `finish`, left to end by itself)."""
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        try:
            while time.perf_counter() - start < timeout:
                if metrics.is_file() and any(
                    line.strip() and json.loads(line)["step"] >= step for line in metrics.read_text().splitlines()
                ):
                    seconds = time.perf_counter() - start
                    if finish and proc.wait(timeout) != 0:
                        raise SystemExit(f"{' '.join(cmd)} failed:\n{log.read_text()[-2000:]}")
                    return seconds
                if proc.poll() is not None:
                    raise SystemExit(f"{' '.join(cmd)} ended before step {step}:\n{log.read_text()[-2000:]}")
                time.sleep(0.02)
            raise SystemExit(f"{' '.join(cmd)}: no step {step} within {timeout:.0f} s")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------------
# The two preparations
# --------------------------------------------------------------------------------------------------


def prepare_ours(corpus: Path, tokenizer: Path, out: Path, args, env: dict) -> dict:
    cmd = [sys.executable, "-m", "roformer.cli", "prepare", "--config", str(RECIPE), "--out", str(out),
           "--num_proc", str(args.num_proc), f"data.tokenizer={tokenizer}", f"data.train_files=[{corpus}]",
           f"data.max_seq_length={args.block}"]  # fmt: skip
    result = run_measured(cmd, out.with_name(out.name + ".log"), args.timeout, env)
    manifest = json.loads((out / "manifest.json").read_text())
    result["tokens"] = sum(c["tokens"] for c in manifest["counts"].values())
    result["inner_seconds"] = manifest["prepare_seconds"]  # the preparation itself, without start-up
    result["disk"] = disk_bytes(out)
    return result


def prepare_anchor(corpus: Path, tokenizer: Path, cache: Path, args, env: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_anchor", str(corpus), str(tokenizer), str(cache),
           str(args.num_proc), str(args.block)]  # fmt: skip
    result = run_measured(cmd, cache.with_name(cache.name + ".log"), args.timeout, env)
    result.update(json.loads((cache / "result.json").read_text()))
    result["disk"] = disk_bytes(cache)
    return result


def anchor_main(corpus: str, tokenizer: str, cache: str, num_proc: str, block: str) -> None:
    """transformers' run_mlm.py data path (its tokenize_function and group_texts, not line_by_line)."""
    from itertools import chain

    import datasets
    from transformers import AutoTokenizer

    num_proc, block = int(num_proc), int(block)
    tok = AutoTokenizer.from_pretrained(tokenizer)
    raw = datasets.load_dataset("text", data_files={"train": corpus}, cache_dir=cache)["train"]

    def tokenize_function(examples):
        return tok(examples["text"], return_special_tokens_mask=True)

    tokenized = raw.map(tokenize_function, batched=True, num_proc=num_proc, remove_columns=["text"])

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // block) * block
        return {k: [t[i : i + block] for i in range(0, total_length, block)] for k, t in concatenated.items()}

    grouped = tokenized.map(group_texts, batched=True, num_proc=num_proc)
    final_bytes = sum(Path(f["filename"]).stat().st_size for f in grouped.cache_files)
    Path(cache, "result.json").write_text(json.dumps({"tokens": len(grouped) * block, "final_disk": final_bytes}))


# --------------------------------------------------------------------------------------------------
# Training from the prepared data
# --------------------------------------------------------------------------------------------------


def train_times(prepared: Path, work: Path, args, env: dict) -> dict:
    """Launch -> first step; a real checkpoint at step k; resume -> first new step, at k and at a late position."""
    runs = work / "runs"
    base = [sys.executable, "-m", "roformer.cli", "pretrain", "--config", str(RECIPE), f"data.prepared={prepared}",
            f"data.max_seq_length={args.block}", f"model.max_position_embeddings={args.block}",
            "data.max_validation_blocks=64", "train.log_with=none", "train.log_every=1",
            "train.eval_every=1000000000", "train.save_every=1000000000", *args.train_overrides]  # fmt: skip
    if args.train_threads:  # on a crowded CPU, two OpenMP threads per run can be much slower than one
        env = {**env, "OMP_NUM_THREADS": str(args.train_threads)}
    k, ckpt_run = args.ckpt_steps, runs / "ckpt"
    first_step = seconds_to_step(  # timed to its first step, then left to go on to step k and save there
        [*base, f"output_dir={ckpt_run}", f"train.max_steps={k}"], ckpt_run / "metrics.jsonl", 1,
        work / "first.log", args.timeout, env, finish=True,
    )  # fmt: skip
    ckpt = ckpt_run / "checkpoints" / f"step_{k}"
    resume = seconds_to_step(
        [*base, f"output_dir={ckpt_run}", "train.resume_from=latest", f"train.max_steps={k + 1}"],
        ckpt_run / "metrics.jsonl", k + 1, work / "resume.log", args.timeout, env,
    )  # fmt: skip

    # A late position: 90% through epoch 3, the fourth (an epoch's order is a fresh permutation of all blocks).
    state = json.loads((ckpt / "trainer_state.json").read_text())
    manifest = json.loads((prepared / "manifest.json").read_text())
    per_epoch = manifest["counts"]["train"]["tokens"] // (args.block - 2) // state["micro_batch_size"]
    late = work / "late_ckpt"
    shutil.copytree(ckpt, late)
    position = int(0.9 * per_epoch)
    late_step = 3 * per_epoch + position  # one micro-batch per step on one process (tiny.yaml: batch 16)
    state.update(step=late_step, epoch=3, batches_in_epoch=position)
    (late / "trainer_state.json").write_text(json.dumps(state))
    late_run = runs / "late"
    resume_late = seconds_to_step(
        [*base, f"output_dir={late_run}", f"train.resume_from={late}", f"train.max_steps={late_step + 1}"],
        late_run / "metrics.jsonl", late_step + 1, work / "resume_late.log", args.timeout, env,
    )  # fmt: skip
    return {"first_step_s": first_step, "resume_s": resume, "resume_step": k,
            "resume_late_s": resume_late, "late_step": late_step}  # fmt: skip


def import_seconds(env: dict) -> float:
    """The interpreter and library imports alone: the floor under every launch time above."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import roformer.trainer, roformer.tasks.mlm"], check=True, env=env)
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(KB|MB|GB)", text.strip().upper())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 100MB or 2GB")
    return int(float(match[1]) * {"KB": 1e3, "MB": 1e6, "GB": 1e9}[match[2]])


def table(rows: list[dict]) -> str:
    gb = 1e9
    lines = [
        "| text | ours MB/s | anchor MB/s | ours / anchor | ours peak RSS / PSS | anchor peak RSS / PSS "
        "| ours B/token | anchor B/token | CPU s/MB ours / anchor | first step | resume (step) | resume late (step) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        o, a, t = r["ours"], r["anchor"], r.get("train", {})
        mb = r["bytes"] / MB
        mbs_o, mbs_a = mb / o["seconds"], mb / a["seconds"]
        timing = (
            f"{t['first_step_s']:.1f} s | {t['resume_s']:.1f} s ({t['resume_step']}) "
            f"| {t['resume_late_s']:.1f} s ({t['late_step']:,})"
            if t
            else "- | - | -"
        )
        lines.append(
            f"| {r['bytes'] / MB:,.0f} MB | {mbs_o:.2f} | {mbs_a:.2f} | {mbs_o / mbs_a:.2f}x "
            f"| {o['max_rss'] / gb:.2f} / {o['peak_pss'] / gb:.2f} GB "
            f"| {a['max_rss'] / gb:.2f} / {a['peak_pss'] / gb:.2f} GB "
            f"| {o['disk'] / o['tokens']:.2f} | {a['disk'] / a['tokens']:.2f} "
            f"| {o['cpu_seconds'] / mb:.2f} / {a['cpu_seconds'] / mb:.2f} | {timing} |"
        )
    tg = TARGETS
    lines.append(
        f"| target | | | >= {tg['speedup']:.0f}x | < {tg['rss_gb']:.0f} GB, flat | | <= {tg['bytes_per_token']} | "
        f"| | <= {tg['first_step_s']:.0f} s | <= {tg['resume_s']:.0f} s | <= {tg['resume_s']:.0f} s |"
    )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_anchor":
        return anchor_main(*sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", nargs="+", type=parse_size, default=[parse_size(s) for s in ("100MB", "500MB", "2GB")]
    )
    parser.add_argument(
        "--num_proc", type=int, default=len(os.sched_getaffinity(0)), help="both sides (default: cores)"
    )
    parser.add_argument("--block", type=int, default=128, help="tokens per block, both sides")
    parser.add_argument("--vocab_size", type=int, default=8000, help="the shared WordPiece tokenizer's")
    parser.add_argument("--ckpt_steps", type=int, default=10, help="real training steps before the checkpoint")
    parser.add_argument("--train_threads", type=int, default=None, help="OMP_NUM_THREADS of the training runs")
    parser.add_argument("--no_train", action="store_true", help="only the preparations")
    parser.add_argument("--no_anchor", action="store_true", help="only ours (e.g. when the anchor would not fit)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (and reuse its corpora)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per subprocess")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw measurements here")
    parser.add_argument("--train_overrides", nargs="*", default=[], help="extra dotted overrides for the runs")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_data_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}  # fmt: skip
    rows = []
    try:
        tokenizer = shared_tokenizer(work / "tokenizer", args.vocab_size, args.block)
        for size in args.sizes:
            tag = f"{size / MB:g}MB"
            print(f"[{tag}] writing the corpus", file=sys.stderr)
            corpus = write_corpus(work / f"corpus_{tag}.txt", size)
            row = {"bytes": corpus.stat().st_size}
            for side in ("ours", "anchor"):  # a fresh output each time: nothing is reused between runs
                shutil.rmtree(work / f"{side}_{tag}", ignore_errors=True)
            print(f"[{tag}] roformer prepare", file=sys.stderr)
            row["ours"] = prepare_ours(corpus, tokenizer, work / f"ours_{tag}", args, env)
            if not args.no_anchor:
                print(f"[{tag}] anchor (run_mlm recipe)", file=sys.stderr)
                row["anchor"] = prepare_anchor(corpus, tokenizer, work / f"anchor_{tag}", args, env)
                shutil.rmtree(work / f"anchor_{tag}")  # its cache is large; only its size is kept
            if not args.no_train:
                print(f"[{tag}] training from the prepared data", file=sys.stderr)
                shutil.rmtree(work / f"train_{tag}", ignore_errors=True)
                (work / f"train_{tag}").mkdir()
                row["train"] = train_times(work / f"ours_{tag}", work / f"train_{tag}", args, env)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
        imports = import_seconds(env)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(
        f"{args.num_proc} process(es) per side on {os.cpu_count()} cores, block {args.block}, WordPiece vocabulary "
        f"{args.vocab_size}; MB = 10^6 bytes of text; importing roformer's trainer alone takes {imports:.1f} s"
    )
    if args.no_anchor:
        for row in rows:
            row["anchor"] = {k: float("nan") for k in ("seconds", "cpu_seconds", "max_rss", "peak_pss", "disk")}
            row["anchor"]["tokens"] = 1
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"args": sys.argv[1:], "import_s": imports, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
