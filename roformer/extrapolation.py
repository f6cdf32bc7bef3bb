"""Length extrapolation: masked-LM loss of pretrained runs at 1x, 2x, 4x, 8x their training length.

Each run is evaluated on its own held-out documents (its prepared validation stream), cut into blocks of k times
the training length, with the same number of tokens at every length and masks drawn once. Rotary runs are also
evaluated under each RoPE scaling (the same weights, `rope_scaling` set to k). A learned table cannot index past
its rows: those cells are reported as such rather than crashing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from roformer.compare import save_figure
from roformer.config import load_config
from roformer.errors import DataError
from roformer.modeling import RoFormerForMaskedLM
from roformer.positions import scheme_class
from roformer.tasks.mlm import EVAL_SALT, MaskingCollator, PackedBlocks, prepared_corpus
from roformer.tokenization import load_tokenizer

SCALINGS = ("none", "linear", "ntk", "dynamic_ntk", "yarn")


def _eval_batches(run_dir: Path, tokenizer, block_size: int, max_tokens: int, batch_tokens: int, seed: int):
    cfg = load_config(run_dir / "config.yaml")
    stream = prepared_corpus(cfg).stream("validation", "tokens")  # the run's held-out documents
    blocks = PackedBlocks(stream, block_size, tokenizer.cls_token_id, tokenizer.sep_token_id)
    count = min(len(blocks), max(1, max_tokens // block_size))
    if count == 0:
        raise DataError(f"{run_dir}: the held-out text ({len(stream)} tokens) does not fill a block of {block_size}")
    collate = MaskingCollator(tokenizer, cfg.data.mlm_probability, seed, salt=EVAL_SALT)
    per_batch = max(1, batch_tokens // block_size)
    for start in range(0, count, per_batch):
        yield collate([blocks[k] for k in range(start, min(count, start + per_batch))])


@torch.no_grad()
def mlm_loss(model: RoFormerForMaskedLM, batches) -> tuple[float, float]:
    """Token-weighted MLM loss and accuracy over the masked positions of `batches`."""
    loss_sum = correct = count = 0.0
    for batch in batches:
        out = model(batch["input_ids"], labels=batch["labels"])
        target = batch["labels"][batch["labels"] != -100]
        loss_sum += out.loss.item() * target.numel()
        correct += (out.logits.argmax(-1) == target).sum().item()
        count += target.numel()
    return loss_sum / count, correct / count


def evaluate_lengths(
    run_dirs, factors=(1, 2, 4, 8), scalings=SCALINGS, max_tokens: int = 16384, batch_tokens: int = 4096, seed: int = 0
) -> list[dict]:
    """One row per run x factor x scaling: {run, scheme, scaling, factor, length, loss, accuracy, note}."""
    rows = []
    for run_dir in map(Path, run_dirs):
        if not (run_dir / "final" / "config.json").is_file():  # a user's typo or an unfinished run: one line
            raise DataError(f"{run_dir}: no final/ model here (expected a finished pretraining run directory)")
        base = RoFormerForMaskedLM.from_pretrained(run_dir / "final").eval()
        tokenizer = load_tokenizer(run_dir / "final")
        train_length = load_config(run_dir / "config.yaml").data.max_seq_length
        scheme = base.config.position
        accepted = scheme_class(scheme).rope_scalings  # ("none",) for every scheme but rotary
        longest = scheme_class(scheme).max_length(base.config)  # a learned table's rows, or None
        for factor in factors:
            length = train_length * factor
            batches = list(_eval_batches(run_dir, tokenizer, length, max_tokens, batch_tokens, seed))
            for scaling in [s for s in scalings if s in accepted] or ["none"]:  # every scheme runs unscaled
                if scaling != "none" and factor == 1:
                    continue  # every scaling is the identity at the training length
                row = {"run": run_dir.name, "scheme": scheme, "scaling": scaling, "factor": factor, "length": length}
                if longest is not None and length > longest:
                    note = f"beyond the {scheme} table ({longest} rows)"
                    rows.append({**row, "loss": None, "accuracy": None, "note": note})
                    continue
                model = _with_scaling(base, scaling, factor)
                loss, accuracy = mlm_loss(model, batches)
                rows.append({**row, "loss": loss, "accuracy": accuracy, "note": ""})
    return rows


def _with_scaling(base: RoFormerForMaskedLM, scaling: str, factor: int) -> RoFormerForMaskedLM:
    if scaling == "none":
        return base
    cfg = dataclasses.replace(base.config, rope_scaling=scaling, rope_scaling_factor=float(factor))
    model = RoFormerForMaskedLM(cfg).eval()
    model.load_state_dict(base.state_dict())
    return model


def format_rows(rows: list[dict]) -> str:
    """Markdown: one line per run and scaling, one column per length (loss / accuracy)."""
    lengths = sorted({r["length"] for r in rows})
    keys = list(dict.fromkeys((r["run"], r["scheme"], r["scaling"]) for r in rows))
    lines = [
        "| run | scheme | scaling | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
        "|---|---|---|" + "---|" * len(lengths),
    ]
    for run, scheme, scaling in keys:
        cells = []
        for n in lengths:
            found = [r for r in rows if (r["run"], r["scaling"], r["length"]) == (run, scaling, n)]
            if not found and scaling != "none":  # at 1x every scaling equals no scaling
                found = [r for r in rows if (r["run"], r["scaling"], r["length"]) == (run, "none", n)]
            r = found[0] if found else None
            cells.append(
                "-"
                if r is None
                else ("n/a: " + r["note"] if r["loss"] is None else f"{r['loss']:.3f} / {r['accuracy']:.3f}")
            )
        lines.append(f"| {run} | {scheme} | {scaling} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_rows(rows: list[dict], out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = list(dict.fromkeys((r["run"], r["scaling"]) for r in rows))
    for run, scaling in keys:
        points = sorted(
            (r["length"], r["loss"])
            for r in rows
            if r["run"] == run
            and r["loss"] is not None
            and (r["scaling"] == scaling or (r["factor"] == 1 and r["scaling"] == "none"))
        )
        if points:
            label = run if scaling == "none" else f"{run} + {scaling}"
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set(xscale="log", xlabel="evaluation length (tokens)", ylabel="MLM loss", title="Length extrapolation")
    lengths = sorted({r["length"] for r in rows})
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xticks([], minor=True)  # the log axis's own minor labels (6x10^1, 2x10^2...) crowd the lengths
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, out)
