"""An offline English corpus that every Python installation carries: the documentation of Python itself.

Two sources, neither imported as code: the `pydoc_data` topics (the language reference behind `help()`),
and the docstrings of the standard library's modules, read with `ast` from the .py sources. Each topic and
each module is one document. About 340k words, enough for a small pretraining comparison on a laptop.
"""

from __future__ import annotations

import ast
import functools
import sysconfig
import warnings
from pathlib import Path

SKIPPED_PARTS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "dist-packages", "__pycache__"}


def _topics() -> list[str]:
    from pydoc_data.topics import topics  # a plain dict of strings

    return [topics[name].strip() for name in sorted(topics)]


def _module_docstrings(path: Path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # old escape sequences in some sources
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            return ""
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    docs = [ast.get_docstring(n) for n in nodes]
    return "\n\n".join(d.strip() for d in docs if d and len(d.split()) >= 4)


@functools.cache  # parsing the standard library takes seconds; a comparison asks once per run
def builtin_documents() -> tuple[str, ...]:
    """Python's documentation as documents, in a fixed order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents = _topics()
    for path in sorted(stdlib.rglob("*.py")):
        if SKIPPED_PARTS.intersection(path.relative_to(stdlib).parts):
            continue
        text = _module_docstrings(path)
        if len(text.split()) >= 20:
            documents.append(text)
    return tuple(documents)
