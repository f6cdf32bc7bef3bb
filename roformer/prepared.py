"""The on-disk format of a prepared dataset: token ids in memory-mapped shard files, with lengths and a manifest.

```
DIR/manifest.json              what was prepared from what: sources, counts, tokenizer fingerprint, block length
DIR/tokenizer/                 the tokenizer that made the ids
DIR/<split>/<stream>-00000.bin token ids, raw little-endian uint16 (vocabularies up to 65,536) or uint32
DIR/<split>/<stream>-00000.len one uint32 per document (or sentence): its length in tokens
```

An MLM split has one stream, `tokens` (each document followed by [SEP]); a translation split has `source` and
`target` (each sentence followed by EOS). Shards are appended to, then closed at a size; a preparation that is
interrupted truncates them back to its last recorded progress when it resumes. A dataset is written under
`DIR.partial` and renamed to DIR when complete, so a half-written dataset is never taken for a finished one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from roformer.errors import DataError

FORMAT_VERSION = 1
LENGTH_DTYPE = np.dtype("<u4")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def write_json_atomically(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


@dataclass
class ShardInfo:
    file: str
    tokens: int = 0
    items: int = 0


@dataclass
class StreamWriter:
    """Appends arrays of token ids (and the lengths of the items they hold) to shard files of about
    `shard_tokens` tokens; a shard is closed only between items."""

    directory: Path
    name: str
    dtype: np.dtype
    shard_tokens: int
    shards: list[ShardInfo] = field(default_factory=list)

    def _paths(self, shard: ShardInfo) -> tuple[Path, Path]:
        return self.directory / shard.file, self.directory / shard.file.replace(".bin", ".len")

    def append(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        if not len(lengths):
            return
        if not self.shards or self.shards[-1].tokens >= self.shard_tokens:
            self.shards.append(ShardInfo(f"{self.name}-{len(self.shards):05d}.bin"))
        shard = self.shards[-1]
        bin_path, len_path = self._paths(shard)
        with open(bin_path, "ab") as f:
            f.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        with open(len_path, "ab") as f:
            f.write(np.ascontiguousarray(lengths, dtype=LENGTH_DTYPE).tobytes())
        shard.tokens += int(len(tokens))
        shard.items += int(len(lengths))

    def sync(self) -> None:
        """Make what was appended durable before progress that counts it is recorded."""
        if self.shards:
            for path in self._paths(self.shards[-1]):
                with open(path, "rb+") as f:
                    os.fsync(f.fileno())

    def state(self) -> list[dict]:
        return [vars(s).copy() for s in self.shards]

    def restore(self, state: list[dict]) -> None:
        """Back to a recorded state: files past it are removed, the open shard is truncated to its count."""
        self.shards = [ShardInfo(**s) for s in state]
        known = {s.file for s in self.shards} | {s.file.replace(".bin", ".len") for s in self.shards}
        for path in self.directory.glob(f"{self.name}-*"):
            if path.name not in known:
                path.unlink()
        for shard in self.shards:
            bin_path, len_path = self._paths(shard)
            os.truncate(bin_path, shard.tokens * self.dtype.itemsize)
            os.truncate(len_path, shard.items * LENGTH_DTYPE.itemsize)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


class TokenStream:
    """A split's stream read through memory maps: `tokens(start, stop)` over the concatenated shards, and the
    items' lengths and offsets. Maps are opened on first use, so the object pickles cheaply to DataLoader workers."""

    def __init__(self, directory: Path, name: str, shards: list[dict], dtype: np.dtype):
        self.directory, self.name, self.dtype = directory, name, np.dtype(dtype)
        self.shards = [ShardInfo(**s) for s in shards]
        self.shard_starts = np.cumsum([0] + [s.tokens for s in self.shards])
        self._maps: list[np.ndarray] | None = None
        self._offsets: np.ndarray | None = None

    def check(self, where: str) -> None:
        """Every shard present at its recorded size (a truncated or missing file is an error naming it)."""
        for shard in self.shards:
            for path, expected in (
                (self.directory / shard.file, shard.tokens * self.dtype.itemsize),
                (self.directory / shard.file.replace(".bin", ".len"), shard.items * LENGTH_DTYPE.itemsize),
            ):
                if not path.is_file():
                    raise DataError(f"{where}: shard {path} is missing; prepare the dataset again")
                if path.stat().st_size != expected:
                    raise DataError(
                        f"{where}: shard {path} has {path.stat().st_size} bytes, the manifest says {expected} "
                        "(truncated or overwritten); prepare the dataset again"
                    )

    def __getstate__(self):
        return {**self.__dict__, "_maps": None, "_offsets": None}

    @property
    def maps(self) -> list[np.ndarray]:
        if self._maps is None:
            self._maps = [
                np.memmap(self.directory / s.file, dtype=self.dtype, mode="r") if s.tokens else np.zeros(0, self.dtype)
                for s in self.shards
            ]
        return self._maps

    def __len__(self) -> int:
        """Tokens in the stream."""
        return int(self.shard_starts[-1])

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Token ids [start, stop) of the stream, across shard boundaries."""
        pieces = []
        shard = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        while start < stop:
            base = int(self.shard_starts[shard])
            end = min(stop, int(self.shard_starts[shard + 1]))
            pieces.append(self.maps[shard][start - base : end - base])
            start, shard = end, shard + 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def lengths(self) -> np.ndarray:
        """Each item's length (int64); read whole, 4 bytes per document or sentence."""
        arrays = [np.fromfile(self.directory / s.file.replace(".bin", ".len"), dtype=LENGTH_DTYPE) for s in self.shards]
        return np.concatenate(arrays).astype(np.int64) if arrays else np.zeros(0, np.int64)

    @property
    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            self._offsets = np.concatenate(([0], np.cumsum(self.lengths())))
        return self._offsets

    def item(self, i: int) -> np.ndarray:
        return self.tokens(int(self.offsets[i]), int(self.offsets[i + 1]))


class PreparedDataset:
    """A finished prepared dataset, opened read-only."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if not manifest.is_file():
            partial = self.path.with_name(self.path.name + ".partial")
            hint = f" (an unfinished preparation is in {partial}: run the same prepare command to finish it)"
            raise DataError(f"{self.path}: not a prepared dataset, no manifest.json{hint if partial.is_dir() else ''}")
        try:
            self.manifest = json.loads(manifest.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataError(f"{manifest}: not valid JSON; prepare the dataset again") from None
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{manifest}: format_version {self.manifest.get('format_version')} is not {FORMAT_VERSION}; "
                "prepare the dataset again with this version"
            )
        self.dtype = np.dtype(self.manifest["dtype"])

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def block_length(self) -> int | None:
        return self.manifest.get("block_length")

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    def stream(self, split: str, name: str) -> TokenStream:
        splits = self.manifest["splits"]
        if split not in splits or name not in splits[split]:
            raise DataError(f"{self.path}: the prepared dataset has no {split}/{name} data")
        stream = TokenStream(self.path / split, name, splits[split][name], self.dtype)
        stream.check(str(self.path))
        return stream

    def has(self, split: str) -> bool:
        return split in self.manifest["splits"]
