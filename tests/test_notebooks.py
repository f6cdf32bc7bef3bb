"""Every notebook runs top to bottom in a fresh clone: first with no runs at all (it says which command makes
them), then after the command a newcomer runs first, `make demo`, at a tiny budget given as dotted overrides."""

import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
# `make demo` runs `python -m roformer.cli demo --output_dir runs/demo`; these overrides only shrink it
TINY_DEMO = [
    "data.max_documents=60",
    "data.tokenizer_vocab_size=500",
    "train.max_steps=3",
    "train.eval_every=2",
    "train.log_every=1",
    "train.per_device_batch_size=4",
]


def execute(path: Path) -> nbformat.NotebookNode:
    book = nbformat.read(path, as_version=4)
    NotebookClient(
        book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    return book


def outputs(book) -> str:
    return "".join(
        o.get("text", "") + str(o.get("data", {}).get("text/markdown", ""))
        for cell in book.cells
        if cell.cell_type == "code"
        for o in cell.outputs
    )


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A fresh clone's layout: notebooks/ and no runs/ (the package itself is the one under test)."""
    root = tmp_path_factory.mktemp("clone")
    shutil.copytree(NOTEBOOKS, root / "notebooks", ignore=shutil.ignore_patterns("*.png", ".ipynb_checkpoints"))
    return root


def make_demo(root: Path) -> None:
    command = [sys.executable, "-m", "roformer.cli", "demo", "--output_dir", "runs/demo", *TINY_DEMO]
    subprocess.run(command, cwd=root, check=True, capture_output=True, text=True, timeout=300)


def test_rope_properties_notebook(clone):
    text = outputs(execute(clone / "notebooks" / "01_rope_properties.ipynb"))
    assert "max difference after permuting" in text and "mean bound over distances" in text


RUN_NOTEBOOKS = {  # notebook -> (what it shows after `make demo`, the picture it writes)
    "02_compare_convergence.ipynb": ("| eval/loss", "convergence.png"),
    "03_length_extrapolation.ipynb": ("beyond the learned table", "extrapolation.png"),
}


def test_run_notebooks_before_and_after_make_demo(clone, monkeypatch):
    monkeypatch.setenv("ROFORMER_FACTORS", "1 2")  # the notebook's own knob: 128 and 256 tokens
    monkeypatch.setenv("ROFORMER_MAX_TOKENS", "512")
    monkeypatch.delenv("ROFORMER_RUNS", raising=False)
    for name in RUN_NOTEBOOKS:  # nothing trained yet: each says which commands make the runs, and stops cleanly
        text = outputs(execute(clone / "notebooks" / name))
        assert "runs/tiny is not there: `roformer demo --config configs/pretrain/tiny.yaml" in text, name
        assert "`make demo` makes it" in text, name
    make_demo(clone)
    for name, (expected, picture) in RUN_NOTEBOOKS.items():
        text = outputs(execute(clone / "notebooks" / name))
        assert "instead" in text and "runs/demo/rotary" in text, name  # the fallback, said once
        assert expected in text, name
        assert (clone / "notebooks" / picture).stat().st_size > 10_000, name
