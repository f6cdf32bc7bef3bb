"""Reading local text files with errors a person can act on (file, line, what is wrong)."""

from __future__ import annotations

from pathlib import Path

from roformer.errors import DataError


def read_utf8(path: str | Path) -> str:
    """The file's text; a missing, empty or non-UTF-8 file is a DataError naming it."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a text file")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line} is not UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start})"
        ) from None
    if not text.strip():
        raise DataError(f"{path}: file is empty (no text)")
    return text


def read_line_aligned(source: str | Path, target: str | Path) -> tuple[list[str], list[str]]:
    """Two line-aligned files (a parallel corpus); differing line counts are an error naming both."""
    src_lines, tgt_lines = read_utf8(source).splitlines(), read_utf8(target).splitlines()
    if len(src_lines) != len(tgt_lines):
        raise DataError(
            f"{source} has {len(src_lines)} lines but {target} has {len(tgt_lines)}; "
            "parallel files must be line-aligned"
        )
    return src_lines, tgt_lines
