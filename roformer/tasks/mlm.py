"""Masked-LM pretraining (BERT style): a prepared token stream cut into full blocks, dynamic seeded masking.

Data: `roformer prepare` (or a run's main process, on first use) turns the corpus into a token stream on disk
in which every document is followed by [SEP]. Block k is [CLS] + the stream's tokens k*(L-2) .. (k+1)*(L-2) +
[SEP]: exactly `max_seq_length` tokens, no padding, read from memory maps whatever the corpus size.

Masking is dynamic (new masks every epoch, 80/10/10 by `DataCollatorForLanguageModeling`) and runs in the
DataLoader on the CPU, each block drawn from a generator seeded by (seed, epoch, block): a resumed run, and a
run split over several processes, mask exactly what the straight single-process run masks.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import DataCollatorForLanguageModeling

from roformer.config import MLMDataConfig, RunConfig
from roformer.corpus import Source, documents, keep_fraction
from roformer.errors import DataError
from roformer.flops import mlm_training_flops_per_token
from roformer.modeling import RoFormerForMaskedLM
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
from roformer.tokenization import load_tokenizer, tokenizer_fingerprint, train_wordpiece

EVAL_SALT = 1_000_003  # keeps evaluation masks apart from any training epoch's
TOKENIZER_ALGORITHM = "wordpiece-bert-lowercase-v1"  # in the fingerprint: a change of training code is a new dataset


# --------------------------------------------------------------------------------------------------
# Sources and preparation
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Sources and preparation
# --------------------------------------------------------------------------------------------------


def corpus_sources(data: MLMDataConfig) -> tuple[list[Source], list[Source]]:
    """(training sources, explicit validation sources) named by the config; no validation source means held out."""
    if data.corpus == "builtin":
        main = Source(builtin=True)
    elif data.corpus == "files":
        if not data.train_files:
            raise DataError("data.train_files is empty; list text files or directories (data.corpus=files)")
        main = Source(files=data.train_files, text_column=data.text_column)
    else:
        if not data.hub_name:
            raise DataError("data.hub_name is empty; name a hub dataset (data.corpus=hub)")
        main = Source(hub_name=data.hub_name, hub_config=data.hub_config, text_column=data.text_column)
    extra = [Source(**dataclasses.asdict(s)) for s in data.sources]  # the config's fields are Source's
    validation = []
    if data.validation_files:
        validation = [Source(files=data.validation_files, text_column=data.text_column)]
    elif data.corpus == "hub" and hub_has_split(main, "validation"):
        validation = [Source(hub_name=data.hub_name, hub_config=data.hub_config, split="validation",
                             text_column=data.text_column)]  # fmt: skip
    return [main, *extra], validation


def hub_has_split(source: Source, split: str) -> bool:
    import datasets

    try:
        return split in datasets.get_dataset_split_names(source.hub_name, source.hub_config)
    except Exception:  # unreachable or unknown: the training split's loading reports it properly
        return False


def check_not_empty(sources: list[Source]) -> None:
    from roformer.corpus import source_documents

    for source in sources:
        if next(iter(source_documents(source)), None) is None:
            where = f"data.hub_name={source.hub_name}" if source.hub_name else ", ".join(source.files) or "builtin"
            raise DataError(f"{where}: the source holds no text (no non-empty document)")


def tokenizer_sample(sources: list[Source], max_bytes: int) -> list[str]:
    """At most ~max_bytes of documents to train the tokenizer on: an evenly spread share when the corpus size is
    known (local files), else the first documents."""
    sizes = [s.size_bytes() for s in sources]
    if None not in sizes and sum(sizes) > max_bytes:
        fraction = max_bytes / sum(sizes)
        return [doc for i, doc in enumerate(documents(sources)) if keep_fraction(i, fraction)]
    sample, size = [], 0
    for doc in documents(sources):
        sample.append(doc)
        size += len(doc)
        if size >= max_bytes:
            break
    return sample


def evenly_spread(index: np.ndarray, fraction: float) -> np.ndarray:
    """Whether each document index is among an evenly spread `fraction` (one in every 1 / fraction), the first
    document included, so that even a corpus of two documents holds one out."""
    return np.ceil((index + 1) * fraction) > np.ceil(index * fraction)


def within_cap(chosen: np.ndarray, lengths: np.ndarray, held_before: int, cap: int) -> np.ndarray:
    """Of the chosen documents, those that come while fewer than `cap` tokens are held out."""
    candidate = np.where(chosen, lengths, 0)
    return held_before + np.cumsum(candidate) - candidate < cap


def corpus_settings(data: MLMDataConfig, train: list[Source], validation: list[Source], tokenizer) -> dict:
    """What decides a prepared corpus's content (its fingerprint), read without reading the text."""
    import platform

    if tokenizer is not None:
        tokenizer_settings = {"fingerprint": tokenizer_fingerprint(tokenizer)}
    else:
        tokenizer_settings = {"train": TOKENIZER_ALGORITHM, "vocab_size": data.tokenizer_vocab_size,
                              "sample_mb": data.tokenizer_sample_mb}  # fmt: skip
    return {
        "sources": [s.describe() for s in train],
        "validation_sources": [s.describe() for s in validation],
        "validation_fraction": None if validation else data.validation_fraction,
        "held_out": "evenly, from the first document",  # the rule of evenly_spread: a change is a new dataset
        "max_validation_blocks": data.max_validation_blocks,
        "max_documents": data.max_documents,
        "block_length": data.max_seq_length,
        "tokenizer": tokenizer_settings,
        "python": platform.python_version() if any(s.builtin for s in train) else None,  # the builtin corpus
    }


def prepare_corpus(
    data: MLMDataConfig, out: str | Path, num_proc: int | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS
) -> PreparedDataset:
    """Prepare the configured corpus into `out` (resuming an interrupted preparation there), or return it when
    `out` already holds it. Documents are held out for validation evenly through the corpus (one in every
    1 / validation_fraction) until max_validation_blocks blocks' worth, unless validation text is named."""
    train_sources, validation_sources = corpus_sources(data)
    given = load_tokenizer(data.tokenizer) if data.tokenizer else None
    prep = Preparation(Path(out), "mlm", corpus_settings(data, train_sources, validation_sources, given), ["tokens"])
    prep.shard_tokens, prep.num_proc = shard_tokens, num_proc or data.num_proc or cores()
    prep.extra_manifest = {"block_length": data.max_seq_length}
    if (finished := prep.finished()) is not None:
        return finished
    check_not_empty(train_sources + validation_sources)
    start = time.perf_counter()

    def make_tokenizer():
        if given is not None:
            return given
        print(f"training a {data.tokenizer_vocab_size}-token WordPiece tokenizer", file=sys.stderr)
        sample = tokenizer_sample(train_sources, data.tokenizer_sample_mb * 2**20)
        return train_wordpiece(sample, data.tokenizer_vocab_size, data.max_seq_length)

    progress = prep.start(make_tokenizer)
    writers = {split: prep.writers(split, progress) for split in ("train", "validation")}
    cap = data.max_validation_blocks * (data.max_seq_length - 2)
    encoder = Encoder(prep.tokenizer, prep.tokenizer.sep_token_id, prep.dtype, prep.num_proc)
    bar = progress_bar(f"preparing {Path(out).name}")
    phases = [("train", itertools.islice(documents(train_sources), data.max_documents))]
    phases += [("validation", documents(validation_sources))] if validation_sources else []
    for phase, docs in phases:
        if progress.get("phase", "train") == "validation" and phase == "train":
            continue  # finished before the interruption
        progress["phase"] = phase
        done = progress.get("documents", 0)
        texts = ((doc,) for doc in itertools.islice(docs, done, None))
        for number, (chunk, [(ids, lengths)]) in enumerate(encoder.map(chunks(texts, CHUNK_CHARS)), start=1):
            if phase == "validation":
                to_valid = np.ones(len(lengths), dtype=bool)
            elif validation_sources:
                to_valid = np.zeros(len(lengths), dtype=bool)
            else:
                to_valid = evenly_spread(done + np.arange(len(lengths)), data.validation_fraction)
            to_valid &= within_cap(to_valid, lengths, progress.get("validation_tokens", 0), cap)
            by_token = np.repeat(to_valid, lengths)
            if phase == "train":
                writers["train"]["tokens"].append(ids[~by_token], lengths[~to_valid])
            writers["validation"]["tokens"].append(ids[by_token], lengths[to_valid])
            done += len(lengths)
            progress["documents"] = done
            progress["validation_tokens"] = progress.get("validation_tokens", 0) + int(lengths[to_valid].sum())
            bar.update(sum(len(doc) for (doc,) in chunk))
            if number % PROGRESS_EVERY == 0:
                prep.record(progress, writers)
        if phase == "train" and validation_sources:
            progress.update(phase="validation", documents=0)
            prep.record(progress, writers)
    bar.close()

    counts = {
        split: {
            "documents": sum(s.items for s in ws["tokens"].shards),
            "tokens": sum(s.tokens for s in ws["tokens"].shards),
        }
        for split, ws in writers.items()
    }
    block = data.max_seq_length - 2
    if counts["train"]["tokens"] < block or counts["validation"]["tokens"] < block:
        prep.abandon()
        raise DataError(
            f"the corpus is too small: {counts['train']['documents']} training and {counts['validation']['documents']}"
            f" validation documents, {counts['train']['tokens']} and {counts['validation']['tokens']} tokens; each "
            f"split needs at least one block of {data.max_seq_length} tokens (data.max_seq_length)"
            + ("" if validation_sources else f"; one document in {1 / data.validation_fraction:.0f} is held out")
        )
    return prep.finish(writers, counts, time.perf_counter() - start)


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cache_path(data: MLMDataConfig) -> Path:
    """Where a recipe's raw sources are prepared on first use: one directory per fingerprint in the cache."""
    cache = Path(data.prepared_cache) if data.prepared_cache else default_cache_dir()
    train, validation = corpus_sources(data)
    given = load_tokenizer(data.tokenizer) if data.tokenizer else None
    return cache / f"mlm-{Preparation(cache, 'mlm', corpus_settings(data, train, validation, given), []).fingerprint}"


def prepared_corpus(cfg: RunConfig, accelerator=None) -> PreparedDataset:
    """The run's prepared dataset: `data.prepared`, or the sources prepared into the cache on first use (by the
    main process; the others wait, under a process-group timeout long enough for a large corpus)."""
    data = cfg.data
    if data.prepared:
        dataset = PreparedDataset(data.prepared)
    else:
        out = cache_path(data)
        if accelerator is None or accelerator.is_main_process:
            prepare_corpus(data, out)
        if accelerator is not None:
            accelerator.wait_for_everyone()
        dataset = PreparedDataset(out)
    where = data.prepared or f"{dataset.path} (prepared from the recipe's sources)"
    if dataset.kind != "mlm":
        raise DataError(f"data.prepared={where}: holds {dataset.kind} data, not an MLM corpus")
    if dataset.block_length != data.max_seq_length:
        raise DataError(
            f"data.prepared={where}: prepared for blocks of {dataset.block_length} tokens, but data.max_seq_length="
            f"{data.max_seq_length}; prepare it again for this length, or train at {dataset.block_length}"
        )
    if data.tokenizer:
        wanted = tokenizer_fingerprint(load_tokenizer(data.tokenizer))
        if wanted != dataset.manifest["tokenizer_fingerprint"]:
            raise DataError(
                f"data.prepared={where}: its token ids come from another tokenizer than data.tokenizer="
                f"{data.tokenizer} (fingerprints {dataset.manifest['tokenizer_fingerprint']} and {wanted})"
            )
    return dataset


# --------------------------------------------------------------------------------------------------
# Blocks and masking
# --------------------------------------------------------------------------------------------------


class PackedBlocks(torch.utils.data.Dataset):
    """Block k of a token stream: [CLS] + stream[k*(L-2) : (k+1)*(L-2)] + [SEP], exactly L tokens.

    Keys may run past len(self): key = epoch * len + k, so each item knows its position in the data (the seed
    of its mask)."""

    def __init__(self, stream: TokenStream, block_length: int, cls_id: int, sep_id: int, limit: int | None = None):
        self.stream, self.body, self.cls_id, self.sep_id = stream, block_length - 2, cls_id, sep_id
        self.count = len(stream) // self.body if limit is None else min(limit, len(stream) // self.body)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, key: int) -> dict:
        k = int(key) % self.count
        block = np.empty(self.body + 2, dtype=np.int64)
        block[0], block[-1] = self.cls_id, self.sep_id
        block[1:-1] = self.stream.tokens(k * self.body, (k + 1) * self.body)
        return {"input_ids": block, "key": int(key)}


class MaskingCollator:
    """Stacks blocks and masks them 80/10/10 (`DataCollatorForLanguageModeling`), each row with a generator
    seeded by (seed, salt, key): the same block at the same position in the data gets the same mask, in any
    process and after any resume. Blocks are never padded, so no attention mask is passed (SDPA's fast path).
    `masked_width` (an int) bounds every row's masked tokens, so the model's step reads nothing from the device."""

    def __init__(self, tokenizer, mlm_probability: float, seed: int, salt: int = 0):
        self.collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability)
        self.special_ids = torch.tensor(tokenizer.all_special_ids)
        self.seed, self.salt = seed, salt

    def row_seed(self, key: int) -> int:
        return (self.seed * 0x9E3779B1 + self.salt * 0x85EBCA77 + key) % 2**63

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor | int]:
        ids = torch.from_numpy(np.stack([item["input_ids"] for item in items]))
        special = torch.isin(ids, self.special_ids)
        inputs, labels = ids.clone(), torch.empty_like(ids)
        for row, item in enumerate(items):
            self.collator.generator = torch.Generator().manual_seed(self.row_seed(item["key"]))
            inputs[row], labels[row] = self.collator.torch_mask_tokens(
                ids[row : row + 1].clone(), special[row : row + 1]
            )
        # the longest row's masked count, known here on the host: the model's training step needs no read-back
        masked_width = int(labels.ne(-100).sum(dim=1).max()) if labels.numel() else 0
        return {"input_ids": inputs, "labels": labels, "masked_width": masked_width}


# --------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------


class MLMTask(Task):
    init_from_class = RoFormerForMaskedLM

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.data: MLMDataConfig = cfg.data

    def setup(self, accelerator, run_dir: Path) -> None:
        data, cfg = self.data, self.cfg
        self.load_init_from()
        if self.init_path is not None and not data.tokenizer and self.has_tokenizer(self.init_path):
            data.tokenizer = str(self.init_path)  # continued pretraining reads the text with its own vocabulary
        self.dataset = prepared_corpus(cfg, accelerator)
        data.prepared = str(self.dataset.path.resolve())  # config.yaml names the exact data, from any directory
        made_with = self.dataset.manifest["tokenizer_fingerprint"]
        tokenizer = self.resolve_tokenizer(accelerator, run_dir, lambda: load_tokenizer(self.dataset.tokenizer_dir))
        if tokenizer_fingerprint(tokenizer) != made_with:  # e.g. a resumed run's own against another dataset
            raise DataError(
                f"data.prepared={self.dataset.path}: its token ids come from another tokenizer than the run's "
                f"(fingerprints {made_with} and {tokenizer_fingerprint(tokenizer)})"
            )
        tok = self.tokenizer
        self.train_blocks = PackedBlocks(
            self.dataset.stream("train", "tokens"), data.max_seq_length, tok.cls_token_id, tok.sep_token_id
        )
        self.eval_blocks = PackedBlocks(
            self.dataset.stream("validation", "tokens"),
            data.max_seq_length,
            tok.cls_token_id,
            tok.sep_token_id,
            limit=data.max_validation_blocks,
        )

    def build_model(self) -> RoFormerForMaskedLM:
        return self.initial_weights(RoFormerForMaskedLM(self.cfg.model))

    def train_dataset(self) -> PackedBlocks:
        return self.train_blocks

    def train_collator(self) -> MaskingCollator:
        return MaskingCollator(self.tokenizer, self.data.mlm_probability, self.cfg.train.seed)

    def epoch_batches(self, epoch: int, batch_size: int) -> np.ndarray:
        """The epoch's blocks in a seeded random order, as keys that carry the epoch (a new mask every epoch)."""
        n = len(self.train_blocks)
        order = np.random.default_rng([self.cfg.train.seed, epoch]).permutation(n)
        usable = n // batch_size * batch_size
        return (order[:usable] + epoch * n).reshape(-1, batch_size)

    def eval_dataloader(self) -> torch.utils.data.DataLoader:
        """Evaluation masks are drawn once per block (a fixed salt), so every evaluation scores the same predictions."""
        return torch.utils.data.DataLoader(
            self.eval_blocks,
            batch_size=self.cfg.train.per_device_batch_size,
            collate_fn=MaskingCollator(self.tokenizer, self.data.mlm_probability, self.cfg.train.seed, EVAL_SALT),
            num_workers=self.cfg.train.num_workers,
        )

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].numel()

    def flops_per_token(self) -> float:
        return mlm_training_flops_per_token(self.cfg.model, self.data.max_seq_length, self.data.mlm_probability)

    def evaluate(self, model, dataloader, accelerator, max_batches: int | None = None) -> dict[str, float]:
        totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss sum, correct, masked tokens
        for i, batch in enumerate(dataloader):
            if max_batches is not None and i >= max_batches:
                break
            labels = batch["labels"]
            logits = model(batch["input_ids"], labels=labels).logits  # (N, V), the masked positions only
            masked = labels != -100
            rows = masked.nonzero()[:, 0]  # the example each masked token belongs to
            target = labels[masked]
            per_token = torch.stack(
                [
                    torch.nn.functional.cross_entropy(logits.float(), target, reduction="none"),
                    (logits.argmax(-1) == target).float(),
                    torch.ones_like(target, dtype=torch.float),
                ],
                dim=1,
            ).double()
            per_example = torch.zeros(labels.shape[0], 3, dtype=torch.float64, device=logits.device)
            per_example.index_add_(0, rows, per_token)
            totals += accelerator.gather_for_metrics(per_example).sum(0)
        totals = totals.cpu()
        loss = (totals[0] / totals[2]).item()
        return {"loss": loss, "mlm_accuracy": (totals[1] / totals[2]).item(), "perplexity": math.exp(min(loss, 50.0))}
