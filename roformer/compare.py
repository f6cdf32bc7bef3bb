"""Run directories -> a comparison table and a plot of their convergence curves (the paper's Figure 3)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from roformer.errors import DataError
from roformer.tracking import read_metrics


def load_run(run_dir: str | Path) -> dict:
    """A run's config, metric rows and final results; a directory without metrics.jsonl is an error."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise DataError(f"{run_dir}: no metrics.jsonl here (not a run directory)")
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    results_file = run_dir / "eval_results.json"
    return {
        "name": run_dir.name,
        "dir": run_dir,
        "config": config,
        "rows": read_metrics(run_dir),
        "results": json.loads(results_file.read_text()) if results_file.is_file() else {},
    }


def series(rows: list[dict], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    points = [(r[x], r[key]) for r in rows if key in r and x in r]
    return [p[0] for p in points], [p[1] for p in points]


def _last(rows: list[dict], key: str):
    values = [r[key] for r in rows if key in r]
    return values[-1] if values else None


def scheme_label(config: dict) -> str:
    """The position scheme, and the attention when it is not softmax (e.g. "rotary, linear-elu attention")."""
    model = config.get("model", {})
    label = model.get("position", "?")
    if model.get("attention", "softmax") != "softmax":
        label += f", {model['attention']}-{model.get('linear_feature_map', '?')} attention"
    return label


def summary_row(run: dict) -> dict:
    rows = run["rows"]
    speeds = [r["train/tokens_per_s"] for r in rows if "train/tokens_per_s" in r]
    eval_keys = sorted({k for r in rows for k in r if k.startswith("eval/")})
    row = {
        "run": run["name"],
        "scheme": scheme_label(run["config"]),
        "steps": max((r["step"] for r in rows), default=0),
        "tokens/s": sum(speeds[1:]) / len(speeds[1:]) if len(speeds) > 1 else (speeds[0] if speeds else None),
    }
    for key in eval_keys:
        row[key] = run["results"].get(key, _last(rows, key))
    return row


def format_table(rows: list[dict]) -> str:
    """A Markdown table (readable in a terminal, pasteable into docs)."""
    columns = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def plot_runs(runs: list[dict], out: str | Path, keys=("train/loss", "eval/loss", "eval/bleu")) -> Path:
    """One panel per metric the runs logged (of `keys`) against steps, and the same against training tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [k for k in keys if any(series(run["rows"], k)[0] for run in runs)]
    fig, axes = plt.subplots(2, len(present), figsize=(6 * len(present) + 2.5, 8), squeeze=False)
    styles = _line_styles(runs, plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for col, key in enumerate(present):
        for run, style in zip(runs, styles, strict=True):
            label = f"{run['name']} ({scheme_label(run['config'])})"
            steps, values = series(run["rows"], key)
            axes[0][col].plot(steps, values, label=label, **style)
            axes[1][col].plot(_tokens_at(run["rows"], steps), values, label=label, **style)
        axes[0][col].set(title=key, xlabel="step", ylabel=key)
        axes[1][col].set(title=f"{key} vs tokens", xlabel="training tokens", ylabel=key)
        for ax in (axes[0][col], axes[1][col]):
            ax.grid(alpha=0.3)
    # one legend beside the panels: inside them it hides the curves once there are a dozen runs
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    return save_figure(fig, out)


def _line_styles(runs: list[dict], colors: list[str]) -> list[dict]:
    """One colour per position scheme, one dash pattern per run of it (its seeds): schemes compare at a glance."""
    dashes = ["-", "--", ":", "-."]
    schemes = list(dict.fromkeys(scheme_label(run["config"]) for run in runs))
    seen: dict[str, int] = {}
    styles = []
    for run in runs:
        scheme = scheme_label(run["config"])
        nth = seen[scheme] = seen.get(scheme, -1) + 1
        styles.append({"color": colors[schemes.index(scheme) % len(colors)], "linestyle": dashes[nth % len(dashes)]})
    return styles


def save_figure(fig, out: str | Path) -> Path:
    """Lay out, write as PNG (creating the folder) and free the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")  # a legend placed beside the panels stays in the picture
    plt.close(fig)
    return out


def _tokens_at(rows: list[dict], steps: list[int]) -> list[float]:
    """Training tokens seen by each step (interpolated between logged points)."""
    logged = [(r["step"], r["train/tokens"]) for r in rows if "train/tokens" in r]
    if not logged:
        return list(steps)
    out = []
    for step in steps:
        before = [t for s, t in logged if s <= step]
        out.append(before[-1] if before else logged[0][1] * step / max(logged[0][0], 1))
    return out


def value_at(rows: list[dict], key: str, step: int):
    """The metric logged at exactly `step` (None if it was not)."""
    return next((r[key] for r in rows if r.get("step") == step and key in r), None)


def steps_table(runs: list[dict], steps: list[int], keys=("eval/loss", "eval/mlm_accuracy", "eval/bleu")) -> str:
    """Per scheme, the metrics (of `keys`, those the runs logged) at fixed steps: the mean over the runs (seeds)
    and, with several, their range."""
    keys = [k for k in keys if any(k in r for run in runs for r in run["rows"])]
    by_scheme: dict[str, list[dict]] = {}
    for run in runs:
        by_scheme.setdefault(scheme_label(run["config"]), []).append(run)
    table = []
    for scheme, group in by_scheme.items():
        row = {"scheme": scheme, "runs": len(group)}
        for key in keys:
            for step in steps:
                values = [v for v in (value_at(r["rows"], key, step) for r in group) if v is not None]
                if not values:
                    row[f"{key} @{step}"] = None
                    continue
                mean = sum(values) / len(values)
                spread = f" ({min(values):.4f}-{max(values):.4f})" if len(values) > 1 else ""
                row[f"{key} @{step}"] = f"{mean:.4f}{spread}"
        table.append(row)
    return format_table(table)


def compare_runs(run_dirs: list[str | Path], out: str | Path | None = None, at_steps: list[int] | None = None) -> str:
    """Load runs, write the plot (if `out`), return the table (and the per-scheme table at `at_steps`)."""
    runs = [load_run(d) for d in run_dirs]
    if out:
        plot_runs(runs, out)
    table = format_table([summary_row(run) for run in runs])
    if at_steps:
        table += "\n\n" + steps_table(runs, at_steps)
    return table
