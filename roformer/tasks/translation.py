"""Translation (WMT14 En-De as in the paper; any line-aligned parallel text): joint BPE, token-count batches,
label-smoothed cross-entropy, BLEU.

- Data: the hub's `wmt14` (`de-en`; train / validation = newstest2013 / test = newstest2014) or local files
  `<prefix>.<lang>`, line-aligned (data.train_prefix, valid_prefix, test_prefix).
- Training pairs are prepared once (`roformer prepare`, or a run's main process on first use, into the cache):
  streamed from the files or the hub, tokenized in parallel, written as two memory-mapped token streams,
  `source` and `target`, each sentence followed by EOS (roformer.prepared). Runs read them lazily; nothing is
  re-encoded at start. Dev and test sets (a few thousand lines) are read and tokenized at start.
- One BPE vocabulary trained with `tokenizers` on both sides of (a bounded sample of) the training text (the
  paper: 37k), shared by the encoder, the decoder and the output projection. SentencePiece-style spaces
  (Metaspace) make decoding restore the raw text, so BLEU is computed on detokenized output as sacreBLEU expects.
- Training pairs are filtered at start from the prepared lengths (cheap, so one prepared corpus serves any
  limits), as Moses' clean-corpus-n does in fairseq's WMT14 recipe: both sides non-empty, at most max_*_length
  BPE tokens, length ratio at most max_length_ratio.
- Batches hold up to data.max_tokens tokens as fairseq counts them (sentences x longest side): pairs are sorted
  by length and cut into batches once; the order of the batches is shuffled per epoch by (seed, epoch), so a
  resume seeks to its position directly.
- Evaluation during training: label-smoothed loss, NLL and greedy-decoded BLEU on the dev set (capped by
  train.max_eval_batches). The final evaluation decodes dev and test with beam search (data.beam_size,
  data.length_penalty) and writes the translations beside eval_results.json.
"""

from __future__ import annotations

import codecs
import itertools
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from roformer.bleu import bleu_scores, decode_hypotheses, encode_sources, generation_ids
from roformer.config import RunConfig, TranslationDataConfig
from roformer.corpus import keep_fraction
from roformer.data_files import read_line_aligned
from roformer.errors import ConfigError, DataError
from roformer.generation import generate
from roformer.modeling import RoFormerForSeq2SeqLM
from roformer.prepare import (
    CHUNK_CHARS,
    DEFAULT_SHARD_TOKENS,
    PROGRESS_EVERY,
    Encoder,
    Preparation,
    chunks,
    default_cache_dir,
    progress_bar,
)
from roformer.prepared import PreparedDataset, TokenStream
from roformer.tasks.base import Task
from roformer.tokenization import tokenizer_fingerprint

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3
ENCODE_CHUNK = 100_000  # dev/test sentences tokenized at a time
TOKENIZER_ALGORITHM = "joint-bpe-nfc-metaspace-v1"  # in the fingerprint: a change of training code is a new dataset
READ_BLOCK = 1 << 24  # bytes read at a time when checking a training file


# --------------------------------------------------------------------------------------------------
# Dev and test sets: small, read whole
# --------------------------------------------------------------------------------------------------


@dataclass
class ParallelText:
    source: list[str]
    target: list[str]
    origin: str
    """Where it came from (a file prefix or hub split), for messages."""


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())[:300]


def hub_split(data: TranslationDataConfig, split: str) -> ParallelText:
    """One split of a hub dataset with a `translation` column of {lang: text} (wmt14)."""
    import datasets

    try:
        rows = datasets.load_dataset(data.hub_name, data.hub_config, split=split)
        pairs = rows["translation"]
        source = [p[data.source_lang] for p in pairs]
        target = [p[data.target_lang] for p in pairs]
    except Exception as err:  # the hub is a user's input: report it in one line
        raise DataError(
            f"data.hub_name={data.hub_name} ({data.hub_config}): could not load split {split!r} ({_one_line(err)})"
        ) from None
    return ParallelText(source, target, f"{data.hub_name}:{split}")


def load_split(data: TranslationDataConfig, split: str) -> ParallelText | None:
    """split: valid or test. Local files when their prefix is set, else the hub, else None."""
    prefix = {"valid": data.valid_prefix, "test": data.test_prefix}[split]
    if prefix:
        source, target = read_line_aligned(f"{prefix}.{data.source_lang}", f"{prefix}.{data.target_lang}")
        return ParallelText(source, target, prefix)
    if data.hub_name:
        return hub_split(data, {"valid": "validation", "test": "test"}[split])
    return None


def first(text: ParallelText, limit: int | None) -> ParallelText:
    if limit is None:
        return text
    return ParallelText(text.source[:limit], text.target[:limit], text.origin)


# --------------------------------------------------------------------------------------------------
# Training pairs: streamed from line-aligned files or the hub, never whole in memory
# --------------------------------------------------------------------------------------------------


def training_files(data: TranslationDataConfig) -> tuple[Path, Path]:
    """<train_prefix>.<source_lang> and .<target_lang>, each checked to be a file."""
    paths = tuple(Path(f"{data.train_prefix}.{lang}") for lang in (data.source_lang, data.target_lang))
    for path in paths:
        if path.is_dir():
            raise DataError(f"{path}: is a directory, expected a text file")
        if not path.is_file():
            raise DataError(f"{path}: file not found")
    return paths


def count_lines(path: Path) -> int:
    """The lines of a UTF-8 text file (a last line without a newline counts), read in blocks: never whole in
    memory. A non-UTF-8 or empty file is a DataError naming it (and the line)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    newlines, offset, has_text, last = 0, 0, False, b"\n"
    with open(path, "rb") as f:
        while block := f.read(READ_BLOCK):
            pending = decoder.getstate()[0]  # an incomplete character carried over from the previous block
            try:
                decoder.decode(block)
            except UnicodeDecodeError as err:
                line = newlines + err.object[: err.start].count(b"\n") + 1
                byte, at = err.object[err.start], offset - len(pending) + err.start
                raise DataError(f"{path}: line {line} is not UTF-8 (byte 0x{byte:02x} at offset {at})") from None
            newlines += block.count(b"\n")
            has_text = has_text or bool(block.strip())
            offset, last = offset + len(block), block[-1:]
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataError(f"{path}: line {newlines + 1} is not UTF-8 (a character cut short at the end)") from None
    if not has_text:
        raise DataError(f"{path}: file is empty (no text)")
    return newlines + (last != b"\n")


def file_lines(path: Path) -> Iterator[str]:
    """The file's lines, split at \\n only (a \\r before it dropped), as count_lines counts them."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            raw = raw[:-1] if raw.endswith(b"\n") else raw
            try:
                yield (raw[:-1] if raw.endswith(b"\r") else raw).decode("utf-8")
            except UnicodeDecodeError:  # the file changed since it was checked
                raise DataError(f"{path}: line {number} is not UTF-8") from None


def hub_pairs(data: TranslationDataConfig) -> Iterator[tuple[str, str]]:
    """The hub dataset's training split, streamed: one (source, target) pair per row of its `translation` column."""
    import datasets

    where = f"data.hub_name={data.hub_name} ({data.hub_config})"
    langs = (data.source_lang, data.target_lang)
    try:
        rows = datasets.load_dataset(data.hub_name, data.hub_config, split="train", streaming=True)
    except Exception as err:  # the hub is a user's input: report it in one line
        raise DataError(f"{where}: could not load split 'train' ({_one_line(err)})") from None
    if rows.column_names is not None and "translation" not in rows.column_names:
        raise DataError(f"{where}: no 'translation' column; columns: {', '.join(rows.column_names)}")
    try:
        for row in rows:
            pair = row.get("translation")
            if not isinstance(pair, dict) or any(lang not in pair for lang in langs):
                found = ", ".join(pair) if isinstance(pair, dict) else f"columns {', '.join(row)}"
                raise DataError(f"{where}: a row has no {langs[0]!r} and {langs[1]!r} translation ({found})")
            yield pair[langs[0]] or "", pair[langs[1]] or ""
    except DataError:
        raise
    except Exception as err:  # a stream that breaks off mid-way
        raise DataError(f"{where}: reading the training split failed ({_one_line(err)})") from None


def training_pairs(data: TranslationDataConfig) -> Iterator[tuple[str, str]]:
    """(source, target) of every training pair in order, the first data.max_train_samples when set."""
    if data.train_prefix:
        source, target = training_files(data)
        pairs = zip(file_lines(source), file_lines(target))
    elif data.hub_name:
        pairs = hub_pairs(data)
    else:
        raise DataError("no training data: set data.train_prefix (line-aligned files) or data.hub_name (wmt14)")
    return itertools.islice(pairs, data.max_train_samples)


def training_origin(data: TranslationDataConfig) -> str:
    return data.train_prefix or f"data.hub_name={data.hub_name} ({data.hub_config})"


def check_training_source(data: TranslationDataConfig) -> None:
    """Before anything is written: local files are UTF-8, not empty and of equal line counts (counted in blocks);
    a hub split has at least one pair."""
    if data.train_prefix:
        (source, n_source), (target, n_target) = ((p, count_lines(p)) for p in training_files(data))
        if n_source != n_target:
            raise DataError(
                f"{source} has {n_source} lines but {target} has {n_target}; parallel files must be line-aligned"
            )
    elif next(training_pairs(data), None) is None:
        raise DataError(f"{training_origin(data)}: the training split holds no sentence pair")


def training_source(data: TranslationDataConfig) -> dict:
    """What identifies the training text without reading it: file names, sizes and times, or the hub split."""
    if data.train_prefix:
        return {"files": [{"path": str(p.resolve()), "bytes": p.stat().st_size, "mtime": int(p.stat().st_mtime)}
                          for p in training_files(data)]}  # fmt: skip
    if data.hub_name:
        return {"hub": data.hub_name, "config": data.hub_config, "split": "train"}
    raise DataError("no training data: set data.train_prefix (line-aligned files) or data.hub_name (wmt14)")


def bpe_sample(data: TranslationDataConfig) -> Iterator[str]:
    """Both sides of at most ~data.tokenizer_sample_mb of training pairs: an evenly spread share of local files
    when they are larger, else the first pairs. Streamed into the BPE trainer, never held whole."""
    budget = data.tokenizer_sample_mb * 2**20
    total = sum(p.stat().st_size for p in training_files(data)) if data.train_prefix else None
    if total is not None and total > budget and data.max_train_samples is None:
        for i, (source, target) in enumerate(training_pairs(data)):
            if keep_fraction(i, budget / total):
                yield source
                yield target
        return
    size = 0
    for source, target in training_pairs(data):
        yield source
        yield target
        size += len(source) + len(target)
        if size >= budget:
            return


# --------------------------------------------------------------------------------------------------
# Preparation: the training pairs -> a prepared dataset (two token streams)
# --------------------------------------------------------------------------------------------------


def preparation(data: TranslationDataConfig, out: str | Path, given: PreTrainedTokenizerFast | None) -> Preparation:
    """The preparation of the configured training pairs into `out`; its settings decide the fingerprint."""
    if given is not None:
        tokenizer = {"fingerprint": tokenizer_fingerprint(given)}
    else:
        tokenizer = {"train": TOKENIZER_ALGORITHM, "vocab_size": data.bpe_vocab_size,
                     "sample_mb": data.tokenizer_sample_mb}  # fmt: skip
    settings = {
        "source": training_source(data),
        "languages": [data.source_lang, data.target_lang],
        "max_train_samples": data.max_train_samples,
        "tokenizer": tokenizer,
    }
    prep = Preparation(Path(out), "translation", settings, ["source", "target"])
    prep.extra_manifest = {"languages": [data.source_lang, data.target_lang]}
    return prep


def prepare_parallel(
    data: TranslationDataConfig, out: str | Path, num_proc: int | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS
) -> PreparedDataset:
    """Prepare the configured training pairs into `out` (resuming an interrupted preparation there), or return
    it when `out` already holds it: split `train`, streams `source` and `target`, pair i in both at item i."""
    from roformer.tasks.mlm import cores

    given = load_tokenizer(data.tokenizer, "data.tokenizer") if data.tokenizer else None
    prep = preparation(data, out, given)
    prep.shard_tokens, prep.num_proc = shard_tokens, num_proc or data.num_proc or cores()
    if (finished := prep.finished()) is not None:
        return finished
    check_training_source(data)
    start = time.perf_counter()

    def make_tokenizer():
        if given is not None:
            return given
        print(f"training a {data.bpe_vocab_size}-token joint BPE", file=sys.stderr)
        return train_joint_bpe(bpe_sample(data), data.bpe_vocab_size)

    progress = prep.start(make_tokenizer)
    writers = {"train": prep.writers("train", progress)}
    encoder = Encoder(prep.tokenizer, prep.tokenizer.eos_token_id, prep.dtype, prep.num_proc)
    done = progress.get("pairs", 0)  # a resumed preparation skips the pairs already written
    pairs = itertools.islice(training_pairs(data), done, None)
    bar = progress_bar(f"preparing {Path(out).name}")
    try:
        for number, (chunk, encoded) in enumerate(encoder.map(chunks(pairs, CHUNK_CHARS)), start=1):
            for (ids, lengths), name in zip(encoded, ("source", "target")):
                writers["train"][name].append(ids, lengths)
            done += len(chunk)
            progress["pairs"] = done
            bar.update(sum(len(s) + len(t) for s, t in chunk))
            if number % PROGRESS_EVERY == 0:
                prep.record(progress, writers)
    except DataError:
        prep.abandon()  # the input is unusable: nothing of it is kept
        raise
    finally:
        bar.close()
    shards = {name: writers["train"][name].shards for name in ("source", "target")}
    counts = {"train": {"pairs": done, "tokens": sum(s.tokens for ss in shards.values() for s in ss)}}
    counts["train"].update({f"{name}_tokens": sum(s.tokens for s in ss) for name, ss in shards.items()})
    if done == 0:
        prep.abandon()
        raise DataError(f"{training_origin(data)}: the training data holds no sentence pair")
    return prep.finish(writers, counts, time.perf_counter() - start)


def prepared_parallel(cfg: RunConfig, accelerator) -> PreparedDataset:
    """The run's prepared training pairs: `data.prepared`, or the training source prepared into the cache on
    first use (by the main process; the others wait)."""
    data: TranslationDataConfig = cfg.data
    given = load_tokenizer(data.tokenizer, "data.tokenizer") if data.tokenizer else None
    if data.prepared:
        dataset = PreparedDataset(data.prepared)
        where = data.prepared
    else:
        cache = Path(data.prepared_cache) if data.prepared_cache else default_cache_dir()
        out = cache / f"translation-{preparation(data, cache, given).fingerprint}"
        if accelerator.is_main_process:
            prepare_parallel(data, out)
        accelerator.wait_for_everyone()
        dataset = PreparedDataset(out)
        where = f"{out} (prepared from {training_origin(data)})"
    if dataset.kind != "translation":
        raise DataError(f"data.prepared={where}: holds {dataset.kind} data, not translation pairs")
    languages = dataset.manifest.get("languages")
    if languages != [data.source_lang, data.target_lang]:
        raise DataError(
            f"data.prepared={where}: prepared for {'-'.join(languages or ['?'])}, but data.source_lang="
            f"{data.source_lang} and data.target_lang={data.target_lang}"
        )
    if given is not None and tokenizer_fingerprint(given) != dataset.manifest["tokenizer_fingerprint"]:
        raise DataError(
            f"data.prepared={where}: its token ids come from another tokenizer than data.tokenizer={data.tokenizer} "
            f"(fingerprints {dataset.manifest['tokenizer_fingerprint']} and {tokenizer_fingerprint(given)})"
        )
    return dataset


# --------------------------------------------------------------------------------------------------
# Joint BPE and compact token storage
# --------------------------------------------------------------------------------------------------


def train_joint_bpe(texts, vocab_size: int) -> PreTrainedTokenizerFast:
    """A BPE vocabulary learned from `texts` (both languages), with <pad> <s> </s> <unk> as ids 0-3.

    NFC normalization only (keeps the text as written, so BLEU sees what the references hold), Metaspace
    pre-tokenization (spaces become part of the pieces, so decoding restores the original spacing).
    Deterministic: the same text and settings give the same tokenizer.json in any process (tested).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000,  # lengths are the task's business (data.max_*_length)
    )


def load_tokenizer(path: str | Path, key: str) -> PreTrainedTokenizerFast:
    if not (Path(path) / "tokenizer.json").is_file():
        raise DataError(f"{key}={path}: no tokenizer.json in this directory")
    return PreTrainedTokenizerFast.from_pretrained(str(path))


class TokenArrays:
    """Dev/test token id sequences in memory, stored flat (one int32 array and offsets). Reads as a prepared
    TokenStream does: `item(i)`."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat, self.offsets = flat, offsets

    @classmethod
    def encode(cls, tokenizer, lines: list[str], max_length: int | None = None) -> TokenArrays:
        """Each line as BPE ids followed by EOS (cut to max_length when given)."""
        pieces, lengths = [], []
        for start in range(0, len(lines), ENCODE_CHUNK):
            rows = encode_sources(tokenizer, lines[start : start + ENCODE_CHUNK], max_length)
            lengths.append(np.fromiter(map(len, rows), dtype=np.int64, count=len(rows)))
            pieces.append(np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32))
        lengths_all = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
        flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
        return cls(flat, np.concatenate(([0], np.cumsum(lengths_all))))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def item(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i] : self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


# --------------------------------------------------------------------------------------------------
# Filtering and batching
# --------------------------------------------------------------------------------------------------


def keep_pairs(src_lengths: np.ndarray, tgt_lengths: np.ndarray, data: TranslationDataConfig) -> np.ndarray:
    """Indices of training pairs that pass the filters. Lengths count EOS; the ratio compares the BPE tokens."""
    src, tgt = src_lengths - 1, tgt_lengths - 1
    ok = (src > 0) & (tgt > 0)
    ok &= (src_lengths <= data.max_source_length) & (tgt_lengths <= data.max_target_length)
    ratio = np.maximum(src, tgt) / np.maximum(np.minimum(src, tgt), 1)
    ok &= ratio <= data.max_length_ratio
    return np.flatnonzero(ok)


def token_batches(order: np.ndarray, sizes: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Cut `order` into consecutive batches whose padded size, len(batch) x max size in it, is at most
    `max_tokens` (a single pair larger than that gets a batch of its own). sizes[i]: the longer side of pair i.

    Greedy, as a loop over pairs would cut, but one numpy step per batch: a batch that starts with a pair of
    size s holds at most max_tokens // s pairs, so only that window is looked at (O(n) work in all; WMT14's
    4.5M pairs in about a second)."""
    order = np.asarray(order)
    ordered = np.asarray(sizes, dtype=np.int64)[order]
    n, start, ends = len(order), 0, []
    while start < n:
        window = ordered[start : start + max_tokens // max(int(ordered[start]), 1) + 1]
        padded = np.maximum.accumulate(window) * np.arange(1, len(window) + 1)
        over = np.flatnonzero(padded[1:] > max_tokens)  # the first pair never overflows its own batch
        start += int(over[0]) + 1 if over.size else len(window)
        ends.append(start)
    return np.split(order, ends[:-1]) if ends else []


def length_sorted(src_lengths: np.ndarray, tgt_lengths: np.ndarray, seed: int) -> np.ndarray:
    """All indices sorted by source then target length; ties in a seeded random order. (One stable sort of a
    combined key: lexsort's result, 2-3x faster on millions of pairs.)"""
    shuffled = np.random.default_rng(seed).permutation(len(src_lengths))
    src, tgt = np.asarray(src_lengths, dtype=np.int64)[shuffled], np.asarray(tgt_lengths, dtype=np.int64)[shuffled]
    return shuffled[np.argsort(src * (int(tgt.max(initial=0)) + 1) + tgt, kind="stable")]


class PairCollator:
    """A batch of pair indices -> padded tensors. Source: ids + EOS. Decoder input: BOS + target ids; labels:
    target ids + EOS, -100 on padding. Also `example_index`, which pairs hypotheses with their references.
    `source` and `target` are prepared token streams (training, memory-mapped) or TokenArrays (dev/test)."""

    def __init__(self, source: TokenStream | TokenArrays, target: TokenStream | TokenArrays, pad_id: int, bos_id: int):
        self.source, self.target, self.pad_id, self.bos_id = source, target, pad_id, bos_id

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        src = [self.source.item(i) for i in indices]
        tgt = [self.target.item(i) for i in indices]  # ids + EOS
        n, s_len, t_len = len(indices), max(map(len, src)), max(map(len, tgt))
        input_ids = torch.full((n, s_len), self.pad_id, dtype=torch.long)
        decoder_input_ids = torch.full((n, t_len), self.pad_id, dtype=torch.long)
        labels = torch.full((n, t_len), -100, dtype=torch.long)
        for row, (s, t) in enumerate(zip(src, tgt)):
            input_ids[row, : len(s)] = torch.from_numpy(s.astype(np.int64))
            t = torch.from_numpy(t.astype(np.int64))
            labels[row, : len(t)] = t
            decoder_input_ids[row, 0] = self.bos_id
            decoder_input_ids[row, 1 : len(t)] = t[:-1]
        return {
            "input_ids": input_ids,
            "attention_mask": input_ids.ne(self.pad_id).long(),
            "decoder_input_ids": decoder_input_ids,
            "labels": labels,
            "example_index": torch.as_tensor(np.asarray(indices, dtype=np.int64)),
        }


@dataclass
class Split:
    """A tokenized dev or test split: the raw target text (BLEU references), token arrays and its batches."""

    text: ParallelText
    source: TokenArrays
    target: TokenArrays
    batches: list[np.ndarray]


# --------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------


class Indices(torch.utils.data.Dataset):
    """Item i is i: the collator reads the pairs from the token arrays itself."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class WholeBatch:
    """Collates a DataLoader item that is itself a batch of pair indices."""

    def __init__(self, collate: PairCollator):
        self.collate = collate

    def __call__(self, items: list[np.ndarray]) -> dict[str, torch.Tensor]:
        (indices,) = items
        return self.collate(indices)


class TranslationTask(Task):
    init_from_class = RoFormerForSeq2SeqLM
    tokenizer_files = ("tokenizer.json",)
    MODEL_KEYS = ("input_ids", "attention_mask", "decoder_input_ids", "labels")
    batch_unit = "tokens"  # train.global_batch_size counts tokens, as fairseq's --max-tokens x --update-freq

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.data: TranslationDataConfig = cfg.data

    # ---------------------------------------------------------------------------------------------
    # Data
    # ---------------------------------------------------------------------------------------------

    def setup(self, accelerator, run_dir: Path) -> None:
        data, cfg = self.data, self.cfg
        self.accelerator = accelerator
        self.load_init_from()
        if cfg.model.num_decoder_layers < 1 and not cfg.init_from:
            raise ConfigError("model.num_decoder_layers must be at least 1 for translation (Transformer-base: 6)")
        valid = load_split(data, "valid")  # before the training data: a missing dev set is found at once
        if valid is None:
            raise DataError("no dev set: set data.valid_prefix (line-aligned files) or data.hub_name (wmt14)")
        valid = first(valid, data.max_eval_samples)
        test = load_split(data, "test")
        self.test_text = first(test, data.max_eval_samples) if test is not None else None

        if self.init_path is not None and not data.tokenizer and self.has_tokenizer(self.init_path):
            data.tokenizer = str(self.init_path)  # fine-tuning reads the pairs with the checkpoint's own vocabulary
        self.dataset = prepared_parallel(cfg, accelerator)
        made_with = self.dataset.manifest["tokenizer_fingerprint"]
        tokenizer = self.resolve_tokenizer(
            accelerator, run_dir, lambda: load_tokenizer(self.dataset.tokenizer_dir, "data.prepared")
        )
        if tokenizer_fingerprint(tokenizer) != made_with:  # e.g. a resumed run's own against another dataset
            raise DataError(
                f"data.prepared={self.dataset.path}: its token ids come from another tokenizer than the run's "
                f"(fingerprints {made_with} and {tokenizer_fingerprint(tokenizer)})"
            )
        self._training_data()
        self.valid_split = self._eval_split(valid)

    def read_tokenizer(self, path: str | Path, key: str) -> PreTrainedTokenizerFast:
        return load_tokenizer(path, key)

    def _training_data(self) -> None:
        """The prepared pairs that pass the length filters, sorted by length; read from the lengths alone."""
        data = self.data
        self.train_source = self.dataset.stream("train", "source")  # checks every shard's presence and size
        self.train_target = self.dataset.stream("train", "target")
        src_lengths, tgt_lengths = self.train_source.lengths(), self.train_target.lengths()
        if len(src_lengths) != len(tgt_lengths):
            raise DataError(
                f"{self.dataset.path}: {len(src_lengths)} source but {len(tgt_lengths)} target sentences; "
                "prepare the dataset again"
            )
        src_lengths, tgt_lengths = src_lengths[: data.max_train_samples], tgt_lengths[: data.max_train_samples]
        keep = keep_pairs(src_lengths, tgt_lengths, data)
        if keep.size == 0:
            raise DataError(
                f"{self.dataset.path}: no training pair is left after the length filters "
                f"(data.max_source_length={data.max_source_length}, data.max_target_length={data.max_target_length}, "
                f"data.max_length_ratio={data.max_length_ratio})"
            )
        self._print(
            f"training pairs: {keep.size} of {len(src_lengths)} kept by the length filters ({self.dataset.path})"
        )
        self._train_order = keep[length_sorted(src_lengths[keep], tgt_lengths[keep], self.cfg.train.seed)]
        self._train_sizes = np.maximum(src_lengths, tgt_lengths)
        self._batches_for = None

    def _eval_split(self, text: ParallelText) -> Split:
        """Every pair kept (BLEU is over the whole set); sources and targets cut to the maximum lengths.
        Batches of similar length in a fixed shuffled order, so a capped evaluation sees every length."""
        data = self.data
        source = TokenArrays.encode(self.tokenizer, text.source, data.max_source_length)
        target = TokenArrays.encode(self.tokenizer, text.target, data.max_target_length)
        order = np.argsort(source.lengths(), kind="stable")
        batches = token_batches(order, np.maximum(source.lengths(), target.lengths()), data.max_tokens)
        np.random.default_rng(self.cfg.train.seed).shuffle(batches)
        return Split(text, source, target, batches)

    def _collator(self, split: Split) -> PairCollator:
        return PairCollator(split.source, split.target, self.tokenizer.pad_token_id, self.tokenizer.bos_token_id)

    def train_dataset(self) -> Indices:
        return Indices(len(self._train_sizes))

    def train_collator(self) -> PairCollator:
        pad_id, bos_id = self.tokenizer.pad_token_id, self.tokenizer.bos_token_id
        return PairCollator(self.train_source, self.train_target, pad_id, bos_id)

    def epoch_batches(self, epoch: int, batch_size: int) -> list[np.ndarray]:
        """Token batches of at most `batch_size` tokens per process (cut once from the length-sorted pairs), in
        an order shuffled per epoch by (seed, epoch)."""
        if self._batches_for != batch_size:
            self._batches = token_batches(self._train_order, self._train_sizes, batch_size)
            self._batches_for = batch_size
        order = np.random.default_rng([self.cfg.train.seed, epoch]).permutation(len(self._batches))
        return [self._batches[i] for i in order]

    def eval_dataloader(self) -> DataLoader:
        return self._eval_loader(self.valid_split)

    def _eval_loader(self, split: Split) -> DataLoader:
        """An item is a whole precomputed batch (batch_size=1): accelerate's gather_for_metrics counts dataset
        items, so it then drops exactly the batches it repeated to even out the processes."""
        return DataLoader(
            split.batches,
            batch_size=1,
            collate_fn=WholeBatch(self._collator(split)),
            num_workers=self.cfg.train.num_workers,
        )

    # ---------------------------------------------------------------------------------------------
    # Model and loss
    # ---------------------------------------------------------------------------------------------

    def build_model(self) -> RoFormerForSeq2SeqLM:
        return self.initial_weights(RoFormerForSeq2SeqLM(self.cfg.model))

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Label-smoothed cross-entropy (train.label_smoothing; the paper: 0.1), mean over target tokens."""
        inputs = {k: batch[k] for k in self.MODEL_KEYS}
        return model(**inputs, label_smoothing=self.cfg.train.label_smoothing).loss

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum()) + int(batch["labels"].ne(-100).sum())

    # ---------------------------------------------------------------------------------------------
    # Evaluation
    # ---------------------------------------------------------------------------------------------

    def evaluate(self, model, dataloader, accelerator, max_batches: int | None = None) -> dict[str, float]:
        """Dev loss (label-smoothed, as trained), NLL and BLEU of greedy translations."""
        scores, _ = self._decode_split(model, dataloader, accelerator, self.valid_split, 1, max_batches)
        return scores

    def final_evaluation(self, model, dataloader, accelerator, run_dir: Path) -> dict[str, Any]:
        """Dev and test decoded with beam search; translations written to run_dir/{valid,test}_translations.<lang>."""
        beam = self.data.beam_size
        results = {}
        splits = [("eval", "valid", dataloader, self.valid_split)]
        if self.test_text is not None:
            test_split = self._eval_split(self.test_text)
            splits.append(("test", "test", accelerator.prepare(self._eval_loader(test_split)), test_split))
        for prefix, name, loader, split in splits:
            scores, hypotheses = self._decode_split(model, loader, accelerator, split, beam)
            results.update({f"{prefix}/{k}": v for k, v in scores.items()})
            results[f"{prefix}/beam_size"] = beam
            if accelerator.is_main_process:
                path = Path(run_dir) / f"{name}_translations.{self.data.target_lang}"
                path.write_text("".join(h + "\n" for h in hypotheses), encoding="utf-8")
        return results

    def _decode_split(self, model, dataloader, accelerator, split: Split, beam_size: int, max_batches=None):
        """Loss and BLEU over (up to max_batches of) a prepared loader. Returns (scores, hypotheses in order)."""
        net = accelerator.unwrap_model(model)
        totals = np.zeros(3)  # label-smoothed loss sum, NLL sum, target tokens
        found: dict[int, list[int]] = {}
        for i, batch in enumerate(dataloader):
            if max_batches is not None and i >= max_batches:
                break
            record = self._eval_batch(model, net, accelerator, batch, beam_size)
            # one object per batch: gather_for_metrics then drops the batches accelerate duplicated to even out
            # processes (it counts dataset items, and an item of this loader is a whole batch)
            for losses, indices, tokens in accelerator.gather_for_metrics([record], use_gather_object=True):
                totals += losses
                found.update(zip(indices, tokens))
        indices = sorted(found)
        hypotheses = decode_hypotheses(self.tokenizer, [found[i] for i in indices])
        references = [split.text.target[i] for i in indices]
        scores = {
            "loss": totals[0] / max(totals[2], 1),
            "nll_loss": totals[1] / max(totals[2], 1),
            **{k: v for k, v in bleu_scores(hypotheses, references).items() if k in ("bleu", "tok_bleu")},
        }
        return scores, hypotheses

    def _eval_batch(self, model, net, accelerator, batch, beam_size: int):
        """(loss sums, example indices, generated ids) of one batch, on plain Python types for gathering."""
        labels = batch["labels"]
        with torch.no_grad(), accelerator.autocast():
            logits = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"]).logits.float()
            flat_logits, flat_labels = logits.flatten(0, 1), labels.flatten()
            smoothed = F.cross_entropy(
                flat_logits, flat_labels, reduction="sum", label_smoothing=self.cfg.train.label_smoothing
            )
            nll = F.cross_entropy(flat_logits, flat_labels, reduction="sum")
            hyps = generate(
                net,
                batch["input_ids"],
                batch["attention_mask"],
                self.data.generation(beam_size=beam_size),
                **generation_ids(self.tokenizer),
            )
        losses = np.array([smoothed.item(), nll.item(), int(labels.ne(-100).sum())])
        return losses, batch["example_index"].tolist(), hyps.tokens

    def _print(self, message: str) -> None:
        if self.accelerator.is_main_process:
            print(message)
