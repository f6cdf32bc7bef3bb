"""The notebooks run top to bottom on small inputs (the two tiny pretrained runs)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute(name: str) -> nbformat.NotebookNode:
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return book


def outputs(book) -> str:
    return "".join(
        o.get("text", "") + str(o.get("data", {}).get("text/markdown", ""))
        for cell in book.cells
        if cell.cell_type == "code"
        for o in cell.outputs
    )


def test_rope_properties_notebook():
    text = outputs(execute("01_rope_properties.ipynb"))
    assert "max difference after permuting" in text and "mean bound over distances" in text


@pytest.mark.parametrize(
    "name, expected",
    [("02_compare_convergence.ipynb", "| eval/loss"), ("03_length_extrapolation.ipynb", "beyond the learned table")],
)
def test_run_notebooks(name, expected, tiny_pretrained_runs, tmp_path, monkeypatch):
    monkeypatch.setenv("ROFORMER_RUNS", " ".join(map(str, tiny_pretrained_runs)))
    monkeypatch.setenv("ROFORMER_FACTORS", "1 2")
    monkeypatch.setenv("ROFORMER_MAX_TOKENS", "512")
    monkeypatch.setenv("ROFORMER_OUT", str(tmp_path / "plot.png"))
    text = outputs(execute(name))
    assert expected in text
    assert (tmp_path / "plot.png").stat().st_size > 10_000
