"""Finished GLUE runs side by side: one row per run root (a position scheme, a starting point), one column per
task, each cell the task's headline dev metric x100 from `<root>/<task>/eval_results.json`.

    roformer glue-table runs/glue_tiny/rotary runs/glue_tiny/learned runs/glue_tiny/scratch
"""

from __future__ import annotations

import json
from pathlib import Path

from roformer.errors import DataError
from roformer.tasks.glue import GLUE_TASKS


def headline_metric(task: str) -> str:
    """The metric GLUE ranks the task by: the last of its metrics (MRPC/QQP F1, STS-B Spearman, CoLA MCC)."""
    return f"eval/{GLUE_TASKS[task].metrics[-1]}"


def read_scores(root: str | Path) -> dict[str, float]:
    """task -> headline dev metric of every finished run below `root`."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such directory (expected <root>/<task>/eval_results.json)")
    scores = {}
    for task in GLUE_TASKS:
        results = root / task / "eval_results.json"
        if results.is_file():
            scores[task] = json.loads(results.read_text())[headline_metric(task)]
    return scores


def format_glue_table(roots: list[str | Path]) -> str:
    """A Markdown table, tasks in GLUE's order, only the tasks some run finished; '-' where a run is missing."""
    rows = {Path(root).name: read_scores(root) for root in roots}
    tasks = [task for task in GLUE_TASKS if any(task in scores for scores in rows.values())]
    if not tasks:
        raise DataError(f"no finished GLUE run (<task>/eval_results.json) under {', '.join(map(str, roots))}")
    header = ["run", *(f"{task} {headline_metric(task).removeprefix('eval/')}" for task in tasks)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, scores in rows.items():
        cells = [f"{100 * scores[task]:.1f}" if task in scores else "-" for task in tasks]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)
