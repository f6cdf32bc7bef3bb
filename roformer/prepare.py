"""`roformer prepare`: a corpus -> a prepared dataset on disk (roformer.prepared), once, shared by every run.

Documents stream from the sources (roformer.corpus) in chunks, are tokenized by `num_proc` worker processes (the
Rust tokenizer; no Python lists of ids are kept), and are appended in order to memory-mapped shards. Memory is
bounded by the chunks in flight, whatever the corpus size. Progress is recorded every few chunks; an interrupted
preparation resumes from there and ends byte-identical to an uninterrupted one (tests/test_prepare.py).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from roformer.errors import DataError
from roformer.prepared import FORMAT_VERSION, PreparedDataset, StreamWriter, token_dtype, write_json_atomically
from roformer.tokenization import tokenizer_fingerprint

PIECE_CHARS = 100_000  # longer texts are tokenized in pieces (see `pieces`)
CHUNK_CHARS = 2_000_000  # text per worker task: large enough to amortise the hand-off, small enough to stream
PROGRESS_EVERY = 16  # chunks between recorded progress (each record fsyncs the open shards)
DEFAULT_SHARD_TOKENS = 2**28  # 512 MB of uint16 per shard file


def default_cache_dir() -> Path:
    """Where runs prepare raw-source recipes: $ROFORMER_CACHE/prepared, else ~/.cache/roformer/prepared."""
    return Path(os.environ.get("ROFORMER_CACHE", Path.home() / ".cache" / "roformer")) / "prepared"


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Tokenizing, in worker processes
# --------------------------------------------------------------------------------------------------

_worker_tokenizer = None


def _init_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    import signal

    from tokenizers import Tokenizer

    # A forked worker inherits the trainer's stop handlers: the parent decides about stopping, workers just end.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    _worker_tokenizer = Tokenizer.from_str(tokenizer_json)


def pieces(text: str, limit: int | None = None) -> list[str]:
    """`text` cut before spaces into pieces of at most `limit` characters (a hard cut only inside a longer word).
    Tokenizers split words at spaces, so the pieces' ids, concatenated, are the text's ids; but the memory a
    tokenizer takes for one text grows with it (a 50 MB line took 8 GB)."""
    limit = limit or PIECE_CHARS
    if len(text) <= limit:
        return [text]
    out, start = [], 0
    while len(text) - start > limit:
        cut = text.rfind(" ", start + 1, start + limit)
        cut = cut if cut > start else start + limit
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def encode_texts(tokenizer, texts: list[str], end_id: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (the ids of every text followed by `end_id`, flat; each text's length, end included). Long texts
    are encoded in pieces, at most ~CHUNK_CHARS of text at a time."""
    split = [pieces(text) for text in texts]
    flat = [piece for parts in split for piece in parts]
    piece_ids, piece_lengths, group, size = [], [], [], 0
    for index, piece in enumerate(flat):
        group.append(piece)
        size += len(piece)
        if size >= CHUNK_CHARS or index == len(flat) - 1:
            encodings = tokenizer.encode_batch_fast(group, add_special_tokens=False)
            piece_lengths.append(np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(group)))
            piece_ids.append(np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=dtype))
            group, size = [], 0
    starts = np.cumsum([0] + [len(parts) for parts in split[:-1]])
    lengths = np.add.reduceat(np.concatenate(piece_lengths), starts) + 1 if texts else np.zeros(0, np.int64)
    ids = np.empty(int(lengths.sum()), dtype=dtype)
    is_end = np.zeros(len(ids), dtype=bool)
    is_end[np.cumsum(lengths) - 1] = True
    ids[is_end] = end_id
    ids[~is_end] = np.concatenate(piece_ids) if piece_ids else np.zeros(0, dtype)
    return ids, lengths


def _encode_chunk(task: tuple[list[list[str]], int, str]) -> list[tuple[np.ndarray, np.ndarray]]:
    columns, end_id, dtype = task  # one list of texts per stream (MLM: documents; translation: source, target)
    return [encode_texts(_worker_tokenizer, texts, end_id, np.dtype(dtype)) for texts in columns]


def chunks(items: Iterable[tuple[str, ...]], chunk_chars: int) -> Iterator[list[tuple[str, ...]]]:
    """Consecutive items, cut whenever a chunk holds `chunk_chars` characters (a rule that depends only on the
    items from the chunk's start, so a resumed preparation cuts the same chunks)."""
    chunk, size = [], 0
    for item in items:
        chunk.append(item)
        size += sum(map(len, item))
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class Encoder:
    """Tokenizes chunks in order, with `num_proc` processes (at most 2 x num_proc chunks in flight)."""

    def __init__(self, tokenizer, end_id: int, dtype: np.dtype, num_proc: int):
        self.tokenizer_json = tokenizer.backend_tokenizer.to_str()
        self.end_id, self.dtype, self.num_proc = end_id, dtype.str, num_proc

    def map(self, chunked: Iterator[list[tuple[str, ...]]]) -> Iterator[tuple[list, list]]:
        """Yields (chunk, [(ids, lengths) per stream])."""
        if self.num_proc <= 1:
            _init_worker(self.tokenizer_json)
            for chunk in chunked:
                yield chunk, _encode_chunk((list(map(list, zip(*chunk))), self.end_id, self.dtype))
            return
        # fork: no re-import of the caller's main module (spawn would need an `if __name__ == "__main__"` guard
        # in every user script); each worker builds its own tokenizer from JSON and runs it single-threaded.
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        with context.Pool(self.num_proc, _init_worker, (self.tokenizer_json,)) as pool:
            pending: deque = deque()
            for chunk in chunked:
                task = (list(map(list, zip(*chunk))), self.end_id, self.dtype)
                pending.append((chunk, pool.apply_async(_encode_chunk, (task,))))
                if len(pending) >= 2 * self.num_proc:
                    done, result = pending.popleft()
                    yield done, result.get()
            while pending:
                done, result = pending.popleft()
                yield done, result.get()


# --------------------------------------------------------------------------------------------------
# A preparation: settings, resumable progress, the finished manifest
# --------------------------------------------------------------------------------------------------


@dataclass
class Preparation:
    """Writes one prepared dataset into `out` (under `out.partial` until complete)."""

    out: Path
    kind: str
    settings: dict
    """Everything that decides the content (sources as described, tokenizer fingerprint, block length, ...)."""
    streams: list[str]
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    num_proc: int = 1
    extra_manifest: dict = field(default_factory=dict)

    def __post_init__(self):
        self.out = Path(self.out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.fingerprint = fingerprint({"format_version": FORMAT_VERSION, "kind": self.kind, **self.settings})
        self.tokenizer = self.dtype = None

    def finished(self) -> PreparedDataset | None:
        """The dataset, if `out` already holds this exact preparation; an error if it holds another."""
        if not self.out.exists():
            return None
        dataset = PreparedDataset(self.out)
        if dataset.fingerprint != self.fingerprint:
            raise DataError(
                f"{self.out}: already holds a prepared dataset with other settings (fingerprint "
                f"{dataset.fingerprint}, these settings give {self.fingerprint}); choose another output directory"
            )
        return dataset

    def start(self, make_tokenizer: Callable[[], object]) -> dict:
        """Creates or reopens `out.partial` and its tokenizer (made by `make_tokenizer` on a fresh start);
        returns the recorded progress ({} for a fresh start)."""
        from roformer.tokenization import load_tokenizer

        progress_file = self.partial / "progress.json"
        progress = json.loads(progress_file.read_text()) if progress_file.is_file() else {}
        if progress.get("fingerprint") == self.fingerprint and (self.partial / "tokenizer").is_dir():
            self.tokenizer = load_tokenizer(self.partial / "tokenizer")
            print(f"resuming the preparation in {self.partial}", file=sys.stderr)
        else:
            if self.partial.exists():
                shutil.rmtree(self.partial)  # an unfinished preparation of other settings: of no use to anyone
            progress = {}
            self.tokenizer = make_tokenizer()
            self.partial.mkdir(parents=True)
            self.tokenizer.save_pretrained(self.partial / "tokenizer")
            write_json_atomically(progress_file, {"fingerprint": self.fingerprint})
        self.dtype = token_dtype(len(self.tokenizer))
        return progress

    def abandon(self) -> None:
        """Removes the partial dataset (its input turned out to be unusable)."""
        shutil.rmtree(self.partial, ignore_errors=True)

    def writers(self, split: str, progress: dict) -> dict[str, StreamWriter]:
        directory = self.partial / split
        directory.mkdir(exist_ok=True)
        writers = {name: StreamWriter(directory, name, self.dtype, self.shard_tokens) for name in self.streams}
        for name, writer in writers.items():
            writer.restore(progress.get("splits", {}).get(split, {}).get(name, []))
        return writers

    def record(self, progress: dict, writers: dict[str, dict[str, StreamWriter]]) -> None:
        for split_writers in writers.values():
            for writer in split_writers.values():
                writer.sync()
        progress["fingerprint"] = self.fingerprint
        progress["splits"] = {s: {n: w.state() for n, w in ws.items()} for s, ws in writers.items()}
        write_json_atomically(self.partial / "progress.json", progress)

    def finish(self, writers: dict[str, dict[str, StreamWriter]], counts: dict, seconds: float) -> PreparedDataset:
        import roformer

        self.record({}, writers)
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "fingerprint": self.fingerprint,
            "settings": self.settings,
            "tokenizer_fingerprint": tokenizer_fingerprint(self.tokenizer),
            "vocab_size": len(self.tokenizer),
            "dtype": self.dtype.str,
            "counts": counts,
            "splits": {s: {n: w.state() for n, w in ws.items()} for s, ws in writers.items()},
            "code_version": roformer.__version__,
            "prepare_seconds": round(seconds, 1),
            **self.extra_manifest,
        }
        (self.partial / "progress.json").unlink()
        write_json_atomically(self.partial / "manifest.json", manifest)
        os.replace(self.partial, self.out)
        return PreparedDataset(self.out)


def progress_bar(desc: str, total_bytes: int | None = None):
    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, dynamic_ncols=True, mininterval=1.0)
