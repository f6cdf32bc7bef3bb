"""Where pretraining text comes from, read as a stream of documents with bounded memory.

Sources: Python's own documentation (`builtin`), local files (.txt, .jsonl, .parquet, each optionally .gz for
the text formats; directories and globs expand to them) and hub datasets (streamed, one document per row).
Text files split into documents by WikiText's ` = Title = ` headers when the file has them, else at blank
lines; a .jsonl or .parquet row, and a hub row, is one document.
"""

from __future__ import annotations

import glob
import gzip
import io
import itertools
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from roformer.errors import DataError

WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")  # ' = Title = ' starts an article; ' = = Section = = ' does not
TITLE_PEEK_LINES = 10_000  # a text file is WikiText-style when one of its first lines is a title
TEXT_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")


@dataclass
class Source:
    """One corpus: local files, a hub dataset split, or the built-in text. `weight` repeats it (2.0: twice; 0.5:
    every other document), as fairseq's upsampling does."""

    files: list[str] = field(default_factory=list)
    hub_name: str | None = None
    hub_config: str | None = None
    split: str = "train"
    text_column: str = "text"
    weight: float = 1.0
    builtin: bool = False

    def describe(self) -> dict:
        """What identifies the source's content without reading it: names, and each file's size and mtime."""
        if self.builtin:
            return {"builtin": True, "weight": self.weight}
        if self.hub_name:
            return {"hub": self.hub_name, "config": self.hub_config, "split": self.split,
                    "text_column": self.text_column, "weight": self.weight}  # fmt: skip
        files = [  # absolute: the same files give the same fingerprint from any working directory
            {"path": str(p.resolve()), "bytes": p.stat().st_size, "mtime": int(p.stat().st_mtime)} for p in self.paths()
        ]
        return {"files": files, "text_column": self.text_column, "weight": self.weight}

    def paths(self) -> list[Path]:
        return expand_text_files(self.files)

    def size_bytes(self) -> int | None:
        """Bytes of text on disk, when known without reading (local files)."""
        if self.builtin or self.hub_name:
            return None
        return sum(p.stat().st_size for p in self.paths())


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def expand_text_files(paths: list[str]) -> list[Path]:
    """Files as given, globs expanded, and for a directory every text file in it (sorted). Nothing found is an
    error naming the entry."""
    files = []
    for entry in paths:
        path = Path(entry)
        if any(ch in entry for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(entry, recursive=True) if Path(p).is_file())
            if not found:
                raise DataError(f"{entry}: no file matches this pattern")
            files.extend(found)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
            if not found:
                raise DataError(f"{path}: directory has no {', '.join(TEXT_SUFFIXES)} files")
            files.extend(found)
        elif not path.is_file():
            raise DataError(f"{path}: file not found")
        else:
            files.append(path)
    return files


def _text_lines(path: Path) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    read = 0
    try:
        with opener(path, "rb") as raw:
            for line in io.TextIOWrapper(raw, encoding="utf-8", newline=None):
                read += 1
                yield line.rstrip("\n")
    except UnicodeDecodeError as err:  # decoded a chunk ahead: the bad byte is at or after the next line
        raise DataError(f"{path}: not UTF-8 at or after line {read + 1} ({err.reason})") from None
    except (OSError, EOFError) as err:  # a truncated or corrupt .gz
        raise DataError(f"{path}: cannot be read ({err})") from None


def split_documents(lines: Iterable[str], titled: bool) -> Iterator[str]:
    """Lines -> documents: WikiText articles (`titled`), else blank-line paragraphs; whitespace joined by spaces."""
    current: list[str] = []
    for line in lines:
        if titled:
            if WIKITEXT_TITLE.match(line) and current:
                yield " ".join(current)
                current = []
            if line.strip():
                current.append(line.strip())
        elif line.strip():
            current.append(line.strip())
        elif current:
            yield " ".join(current)
            current = []
    if current:
        yield " ".join(current)


def text_file_documents(path: Path) -> Iterator[str]:
    peek = list(itertools.islice(_text_lines(path), TITLE_PEEK_LINES))
    titled = any(WIKITEXT_TITLE.match(line) for line in peek)
    yield from split_documents(itertools.chain(peek, itertools.islice(_text_lines(path), len(peek), None)), titled)


def jsonl_documents(path: Path, column: str) -> Iterator[str]:
    for number, line in enumerate(_text_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {number} is not JSON ({err.msg})") from None
        if not isinstance(row, dict) or column not in row:
            raise DataError(f"{path}: line {number} has no {column!r} field (set data.text_column)")
        yield str(row[column])


def parquet_documents(path: Path, column: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable parquet file ({err})") from None
    if column not in table.schema_arrow.names:
        raise DataError(f"{path}: no column {column!r}; columns: {', '.join(table.schema_arrow.names)}")
    for batch in table.iter_batches(columns=[column], batch_size=1024):
        yield from (str(text) for text in batch.column(0).to_pylist() if text is not None)


def file_documents(path: Path, column: str) -> Iterator[str]:
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        return jsonl_documents(path, column)
    if name.endswith(".parquet"):
        return parquet_documents(path, column)
    return text_file_documents(path)


# --------------------------------------------------------------------------------------------------
# Hub
# --------------------------------------------------------------------------------------------------


def hub_documents(source: Source) -> Iterator[str]:
    """One document per row of a hub dataset split, streamed (a 20 GB corpus is never held in memory)."""
    import datasets

    where = f"data.hub_name={source.hub_name}"
    try:
        rows = datasets.load_dataset(source.hub_name, source.hub_config, split=source.split, streaming=True)
    except Exception as err:  # the hub is a user's input: report it in one line
        message = " ".join(str(err).split())[:300]
        raise DataError(f"{where}: could not load split {source.split!r} ({message})") from None
    columns = rows.column_names
    if columns is not None and source.text_column not in columns:
        raise DataError(f"{where}: no text column {source.text_column!r}; columns: {', '.join(columns)}")
    for row in rows:
        text = row.get(source.text_column)
        if text is None and source.text_column not in row:
            raise DataError(f"{where}: no text column {source.text_column!r}; columns: {', '.join(row)}")
        if text:
            yield str(text)


# --------------------------------------------------------------------------------------------------
# Any source, with its weight
# --------------------------------------------------------------------------------------------------


def _one_pass(source: Source) -> Iterator[str]:
    if source.builtin:
        from roformer.builtin_corpus import builtin_documents

        yield from builtin_documents()
    elif source.hub_name:
        yield from hub_documents(source)
    else:
        for path in source.paths():
            yield from file_documents(path, source.text_column)


def keep_fraction(index: int, fraction: float) -> bool:
    """Whether document `index` is among an evenly spread `fraction` of the documents."""
    return int((index + 1) * fraction) > int(index * fraction)


def source_documents(source: Source) -> Iterator[str]:
    """The source's non-empty documents, repeated or thinned by its weight."""
    whole, part = int(source.weight), source.weight - int(source.weight)
    for _ in range(whole):
        yield from (doc for doc in _one_pass(source) if doc.strip())
    if part > 0:
        docs = (doc for doc in _one_pass(source) if doc.strip())
        yield from (doc for i, doc in enumerate(docs) if keep_fraction(i, part))


def documents(sources: list[Source]) -> Iterator[str]:
    """Every source's documents, one source after the other (training shuffles blocks globally)."""
    for source in sources:
        yield from source_documents(source)
