"""Position-scheme comparisons: one model per scheme (and seed) with the same data, vocabulary and budget.

`make demo` runs `compare_schemes` on the built-in corpus; docs/results.md runs it on ../shared/data/text.
"""

from __future__ import annotations

from pathlib import Path

from roformer.compare import compare_runs
from roformer.config import load_config
from roformer.trainer import train

DEMO_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "pretrain" / "demo.yaml"


def train_shared_tokenizer(recipe: str | Path, out: str | Path, overrides: list[str] | None = None) -> Path:
    """Train the recipe's WordPiece tokenizer (on its bounded sample of the training text) and save it, to share
    between runs or preparations. Training is deterministic: the same text and settings give the same vocabulary."""
    from roformer.tasks.mlm import corpus_sources, tokenizer_sample
    from roformer.tokenization import train_wordpiece

    data = load_config(recipe, overrides).data
    sample = tokenizer_sample(corpus_sources(data)[0], data.tokenizer_sample_mb * 2**20)
    train_wordpiece(sample, data.tokenizer_vocab_size, data.max_seq_length).save_pretrained(out)
    return Path(out)


def run_name(scheme: str, seed: int | None) -> str:
    return scheme if seed is None else f"{scheme}_seed{seed}"


def compare_schemes(
    output_dir: str | Path,
    recipe: str | Path | None = None,
    schemes=("rotary", "sinusoidal", "learned"),
    seeds: list[int] | None = None,
    overrides: list[str] | None = None,
) -> str:
    """Train every scheme (x seed) into output_dir/<scheme>[_seed<s>], then print and return the comparison.

    Runs already finished are kept (resume_from=latest), so an interrupted comparison picks up where it was.
    """
    output_dir, recipe, overrides = Path(output_dir), recipe or DEMO_RECIPE, list(overrides or [])
    if not any(o.startswith("data.prepared=") for o in overrides):  # one corpus and vocabulary for every scheme
        from roformer.tasks.mlm import prepare_corpus

        prepared = output_dir / "prepared"
        print(f"preparing the corpus once, into {prepared}")
        prepare_corpus(load_config(recipe, overrides).data, prepared)
        overrides.append(f"data.prepared={prepared}")
    run_dirs = []
    for seed in seeds or [None]:
        for scheme in schemes:
            run_dir = output_dir / run_name(scheme, seed)
            extra = [f"model.position={scheme}", f"output_dir={run_dir}", "train.resume_from=latest"]
            extra += [f"train.seed={seed}"] if seed is not None else []
            cfg = load_config(recipe, extra + overrides)
            if (run_dir / "eval_results.json").is_file():
                print(f"\n== {run_dir.name}: already trained")
            else:
                print(f"\n== {run_dir.name}: training into {run_dir}")
                if train(cfg).get("status") == "interrupted":  # Ctrl-C or SIGTERM stops the whole comparison
                    raise SystemExit(f"stopped during {run_dir.name}; run the same command again to continue")
            run_dirs.append(run_dir)
    table = compare_runs(run_dirs, output_dir / "compare.png")
    print("\n" + table + f"\n\nplot: {output_dir / 'compare.png'}")
    return table
