"""Masked-LM pretraining (BERT style): corpus, WordPiece tokenizer, document-aware packing, dynamic masking.

Masking is dynamic (new masks every step, 80/10/10 by `DataCollatorForLanguageModeling`) but seeded per
example and step rather than by the global RNG: a resumed run, and a run split over several processes,
mask exactly what the straight single-process run masks.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorForLanguageModeling

from roformer.builtin_corpus import builtin_documents
from roformer.config import MLMDataConfig, RunConfig
from roformer.data_files import expand_text_files, read_utf8
from roformer.errors import DataError
from roformer.modeling import RoFormerForMaskedLM
from roformer.tasks.base import Task
from roformer.tokenization import train_wordpiece

WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")  # ' = Title = ' starts an article; ' = = Section = = ' does not
PACKING_GROUP = 10_000  # documents packed together by one `datasets.map` batch
EVAL_SALT = 1_000_003  # keeps evaluation masks apart from any training step's


# --------------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------------


def split_documents(lines: list[str]) -> list[str]:
    """Lines -> documents: WikiText articles when the text has ' = Title = ' headers, else blank-line paragraphs."""
    if any(WIKITEXT_TITLE.match(line) for line in lines):
        documents, current = [], []
        for line in lines:
            if WIKITEXT_TITLE.match(line) and current:
                documents.append(current)
                current = []
            current.append(line)
        documents.append(current)
        return [" ".join(line.strip() for line in doc if line.strip()) for doc in documents]
    documents, current = [], []
    for line in lines + [""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            documents.append(" ".join(current))
            current = []
    return documents


def read_documents(files: list[str]) -> list[str]:
    documents = []
    for path in expand_text_files(files):
        documents.extend(split_documents(read_utf8(path).splitlines()))
    return [d for d in documents if d.strip()]


def hub_documents(data: MLMDataConfig, split: str) -> list[str]:
    import datasets

    try:
        rows = datasets.load_dataset(data.hub_name, data.hub_config, split=split)
    except Exception as err:  # the hub is a user's input: report it in one line
        raise DataError(f"data.hub_name={data.hub_name}: could not load split {split!r} ({err})") from None
    return split_documents(rows[data.text_column])


def load_corpus(data: MLMDataConfig, seed: int) -> tuple[list[str], list[str]]:
    """(train documents, validation documents) for the configured source."""
    if data.corpus == "builtin":
        train = list(builtin_documents())
    elif data.corpus == "files":
        if not data.train_files:
            raise DataError("data.train_files is empty; list text files or directories (data.corpus=files)")
        train = read_documents(data.train_files)
    else:
        if not data.hub_name:
            raise DataError("data.hub_name is empty; name a hub dataset (data.corpus=hub)")
        train = hub_documents(data, "train")
    if data.max_documents:
        train = train[: data.max_documents]
    if data.validation_files:
        return train, read_documents(data.validation_files)
    if data.corpus == "hub" and not data.validation_files:
        try:
            return train, hub_documents(data, "validation")
        except DataError:
            pass  # no validation split: hold out a fraction below
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    held_out = max(1, round(len(train) * data.validation_fraction))
    if len(train) - held_out < 1:
        raise DataError(f"the corpus has {len(train)} document(s); too few to hold out a validation set")
    return [train[i] for i in sorted(order[held_out:])], [train[i] for i in sorted(order[:held_out])]


# --------------------------------------------------------------------------------------------------
# Tokenizer and packing
# --------------------------------------------------------------------------------------------------


def pack_documents(token_lists: list[list[int]], block_size: int, cls_id: int, sep_id: int) -> list[list[int]]:
    """Document-aware packing: whole documents (or block-sized pieces of long ones), separated by [SEP], are
    packed greedily into blocks of at most `block_size` tokens, each `[CLS] ... [SEP]`. A piece never straddles
    two blocks."""
    room = block_size - 2
    pieces = [ids[i : i + room] for ids in token_lists if ids for i in range(0, len(ids), room)]
    blocks, current = [], []
    for piece in pieces:
        needed = len(piece) + (1 if current else 0)
        if current and len(current) + needed > room:
            blocks.append(current)
            current = []
        current = current + [sep_id] + piece if current else list(piece)
    if current:
        blocks.append(current)
    return [[cls_id, *block, sep_id] for block in blocks]


class BlockCollator:
    """Pads blocks to the longest in the batch; keeps each example's index (its masking seed)."""

    def __init__(self, pad_id: int, special_ids: list[int]):
        self.pad_id = pad_id
        self.special_ids = torch.tensor(special_ids)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), longest), self.pad_id, dtype=torch.long)
        for row, e in enumerate(examples):
            ids[row, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        batch = {
            "input_ids": ids,
            "attention_mask": (ids != self.pad_id).long(),
            "special_tokens_mask": torch.isin(ids, self.special_ids).long(),
            "example_index": torch.tensor([e["example_index"] for e in examples]),
        }
        if "labels" in examples[0]:
            batch["labels"] = torch.full_like(ids, -100)
            for row, e in enumerate(examples):
                batch["labels"][row, : len(e["labels"])] = torch.tensor(e["labels"])
        return batch


class SeededMasker:
    """`DataCollatorForLanguageModeling`'s 80/10/10 masking, each row drawn from its own seeded generator."""

    def __init__(self, tokenizer, mlm_probability: float, seed: int):
        self.collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability)
        self.seed = seed

    def _row_seed(self, salt: int, index: int) -> int:
        return (self.seed * 0x9E3779B1 + salt * 0x85EBCA77 + index) % 2**63

    def __call__(self, batch: dict[str, torch.Tensor], salt: int) -> dict[str, torch.Tensor]:
        """Masks row r with a generator seeded by (seed, salt, example_index[r]); salt is the training step."""
        inputs, labels = batch["input_ids"].clone(), torch.empty_like(batch["input_ids"])
        for row, index in enumerate(batch["example_index"].tolist()):
            self.collator.generator = torch.Generator().manual_seed(self._row_seed(salt, index))
            inputs[row], labels[row] = self.collator.torch_mask_tokens(
                batch["input_ids"][row : row + 1].clone(), batch["special_tokens_mask"][row : row + 1]
            )
        return {"input_ids": inputs, "attention_mask": batch["attention_mask"], "labels": labels}


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
        train_docs, valid_docs = load_corpus(data, cfg.train.seed)
        self.resolve_tokenizer(
            accelerator, run_dir, lambda: train_wordpiece(train_docs, data.tokenizer_vocab_size, data.max_seq_length)
        )

        self.train_blocks = self._blocks(train_docs, accelerator, run_dir / "cache", "train")
        self.eval_blocks = self._blocks(valid_docs, accelerator, run_dir / "cache", "validation")
        if not len(self.train_blocks) or not len(self.eval_blocks):
            raise DataError("the corpus produced no training or validation blocks")
        self.masker = SeededMasker(self.tokenizer, data.mlm_probability, cfg.train.seed)
        self.eval_examples = self._premasked(self.eval_blocks.to_list())

    def _blocks(self, documents: list[str], accelerator, cache_dir: Path, split: str):
        """Tokenize and pack with `datasets.map`, computed once on the main process and cached in the run's
        cache/ under a name that changes with the text, the vocabulary and the block length."""
        import datasets

        tok, block_size = self.tokenizer, self.data.max_seq_length
        key = hashlib.sha256(f"{tok.backend_tokenizer.to_str()}|{block_size}|".encode())
        for document in documents:
            key.update(document.encode())
        prefix = str(cache_dir / f"{split}-{key.hexdigest()[:16]}")

        def tokenize(batch):
            # the Rust tokenizer directly: documents are longer than a block by design, and no warning is due
            return {"ids": [e.ids for e in tok.backend_tokenizer.encode_batch(batch["text"], add_special_tokens=False)]}

        def pack(batch):  # blocks never span two groups of PACKING_GROUP documents
            return {"input_ids": pack_documents(batch["ids"], block_size, tok.cls_token_id, tok.sep_token_id)}

        def number(batch, indices):
            return {"example_index": indices}

        cache_dir.mkdir(parents=True, exist_ok=True)
        with accelerator.main_process_first():
            texts = datasets.Dataset.from_dict({"text": documents})
            ids = texts.map(
                tokenize,
                batched=True,
                remove_columns=["text"],
                cache_file_name=f"{prefix}-ids.arrow",
                desc=f"tokenizing {split}",
            )
            blocks = ids.map(
                pack,
                batched=True,
                batch_size=PACKING_GROUP,
                remove_columns=["ids"],
                cache_file_name=f"{prefix}-blocks.arrow",
                desc=f"packing {split}",
            )
            return blocks.map(number, batched=True, with_indices=True, cache_file_name=f"{prefix}-numbered.arrow")

    def _premasked(self, blocks: list[dict]) -> list[dict]:
        """Evaluation masks are drawn once, so every evaluation scores the same predictions."""
        collate = self._collator()
        examples = []
        for start in range(0, len(blocks), 256):
            masked = self.masker(collate(blocks[start : start + 256]), salt=EVAL_SALT)
            for row, block in enumerate(blocks[start : start + 256]):
                n = len(block["input_ids"])
                examples.append(
                    {
                        "input_ids": masked["input_ids"][row, :n].tolist(),
                        "labels": masked["labels"][row, :n].tolist(),
                        "example_index": block["example_index"],
                    }
                )
        return examples

    def _collator(self) -> BlockCollator:
        tok = self.tokenizer
        return BlockCollator(tok.pad_token_id, tok.all_special_ids)

    def build_model(self) -> RoFormerForMaskedLM:
        return self.initial_weights(RoFormerForMaskedLM(self.cfg.model))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_blocks,
            batch_size=self.cfg.train.per_device_batch_size,
            shuffle=True,
            collate_fn=self._collator(),
            num_workers=self.cfg.train.num_workers,
            drop_last=True,
        )

    def eval_dataloader(self) -> DataLoader:
        return DataLoader(
            self.eval_examples, batch_size=self.cfg.train.per_device_batch_size, collate_fn=self._collator()
        )

    def training_batch(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        return self.masker(batch, salt=step)

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    def evaluate(self, model, dataloader, accelerator, max_batches: int | None = None) -> dict[str, float]:
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct predictions, masked tokens
        for i, batch in enumerate(dataloader):
            if max_batches is not None and i >= max_batches:
                break
            labels = batch["labels"]
            logits = model(batch["input_ids"], batch["attention_mask"], labels=labels).logits  # (N, V), masked only
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
            totals += accelerator.gather_for_metrics(per_example).sum(0).cpu()
        loss = (totals[0] / totals[2]).item()
        return {"loss": loss, "mlm_accuracy": (totals[1] / totals[2]).item(), "perplexity": math.exp(min(loss, 50.0))}
