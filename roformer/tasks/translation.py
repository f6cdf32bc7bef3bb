"""Translation (WMT14 En-De as in the paper; any line-aligned parallel text): joint BPE, token-count batches,
label-smoothed cross-entropy, BLEU.

- Data: the hub's `wmt14` (`de-en`; train / validation = newstest2013 / test = newstest2014) or local files
  `<prefix>.<lang>`, line-aligned (data.train_prefix, valid_prefix, test_prefix).
- One BPE vocabulary trained with `tokenizers` on both sides of the training text (the paper: 37k), shared by
  the encoder, the decoder and the output projection. SentencePiece-style spaces (Metaspace) make decoding
  restore the raw text, so BLEU is computed on detokenized output as sacreBLEU expects.
- Training pairs are filtered as Moses' clean-corpus-n does in fairseq's WMT14 recipe: both sides non-empty,
  at most max_*_length BPE tokens, length ratio at most max_length_ratio.
- Batches hold up to data.max_tokens tokens as fairseq counts them (sentences x longest side): pairs are sorted
  by length and cut into batches once; the DataLoader serves whole batches (batch_size=1) with shuffle=True, so
  the trainer's seeded sampler shuffles the batch order per epoch, reproducibly and across resumes.
- Evaluation during training: label-smoothed loss, NLL and greedy-decoded BLEU on the dev set (capped by
  train.max_eval_batches). The final evaluation decodes dev and test with beam search (data.beam_size,
  data.length_penalty) and writes the translations beside eval_results.json.
"""

from __future__ import annotations

import itertools
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
from roformer.data_files import read_line_aligned
from roformer.errors import ConfigError, DataError
from roformer.generation import generate
from roformer.modeling import RoFormerForSeq2SeqLM, load_pretrained
from roformer.tasks.base import Task

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3
ENCODE_CHUNK = 100_000  # sentences tokenized at a time: WMT14's 4.5M pairs never exist as Python lists at once


# --------------------------------------------------------------------------------------------------
# Parallel text
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
    """split: train, valid or test. Local files when their prefix is set, else the hub, else None."""
    prefix = {"train": data.train_prefix, "valid": data.valid_prefix, "test": data.test_prefix}[split]
    if prefix:
        source, target = read_line_aligned(f"{prefix}.{data.source_lang}", f"{prefix}.{data.target_lang}")
        return ParallelText(source, target, prefix)
    if data.hub_name:
        return hub_split(data, {"train": "train", "valid": "validation", "test": "test"}[split])
    return None


def first(text: ParallelText, limit: int | None) -> ParallelText:
    if limit is None:
        return text
    return ParallelText(text.source[:limit], text.target[:limit], text.origin)


# --------------------------------------------------------------------------------------------------
# Joint BPE and compact token storage
# --------------------------------------------------------------------------------------------------


def train_joint_bpe(texts, vocab_size: int) -> PreTrainedTokenizerFast:
    """A BPE vocabulary learned from `texts` (both languages), with <pad> <s> </s> <unk> as ids 0-3.

    NFC normalization only (keeps the text as written, so BLEU sees what the references hold), Metaspace
    pre-tokenization (spaces become part of the pieces, so decoding restores the original spacing).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS))
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
    """Token id sequences stored flat (one int32 array and offsets): a few bytes per token, not ~36."""

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

    def __getitem__(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i] : self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def subset(self, keep: np.ndarray) -> TokenArrays:
        rows = [self[i] for i in keep]
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        flat = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int32)
        return TokenArrays(flat, np.concatenate(([0], np.cumsum(lengths))))


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
    `max_tokens` (a single pair larger than that gets a batch of its own). sizes[i]: the longer side of pair i."""
    batches, start, longest = [], 0, 0
    for pos, i in enumerate(order):
        grown = max(longest, int(sizes[i]))
        if pos > start and grown * (pos - start + 1) > max_tokens:
            batches.append(order[start:pos])
            start, grown = pos, int(sizes[i])
        longest = grown
    if len(order) > start:
        batches.append(order[start:])
    return batches


def length_sorted(src_lengths: np.ndarray, tgt_lengths: np.ndarray, seed: int) -> np.ndarray:
    """All indices sorted by source then target length; ties in a seeded random order."""
    shuffled = np.random.default_rng(seed).permutation(len(src_lengths))
    return shuffled[np.lexsort((tgt_lengths[shuffled], src_lengths[shuffled]))]


class PairCollator:
    """A batch of pair indices -> padded tensors. Source: ids + EOS. Decoder input: BOS + target ids; labels:
    target ids + EOS, -100 on padding. Also `example_index`, which pairs hypotheses with their references."""

    def __init__(self, source: TokenArrays, target: TokenArrays, pad_id: int, bos_id: int):
        self.source, self.target, self.pad_id, self.bos_id = source, target, pad_id, bos_id

    def __call__(self, items: list[np.ndarray]) -> dict[str, torch.Tensor]:
        (indices,) = items  # the DataLoader serves one precomputed batch at a time
        src = [self.source[i] for i in indices]
        tgt = [self.target[i] for i in indices]  # ids + EOS
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
    """A tokenized split: the raw target text (BLEU references), token arrays and its batches."""

    text: ParallelText
    source: TokenArrays
    target: TokenArrays
    batches: list[np.ndarray]


# --------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------


class TranslationTask(Task):
    MODEL_KEYS = ("input_ids", "attention_mask", "decoder_input_ids", "labels")

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.data: TranslationDataConfig = cfg.data

    # ---------------------------------------------------------------------------------------------
    # Data
    # ---------------------------------------------------------------------------------------------

    def setup(self, accelerator, run_dir: Path) -> None:
        data, cfg = self.data, self.cfg
        self.accelerator = accelerator
        if cfg.model.num_decoder_layers < 1 and not cfg.init_from:
            raise ConfigError("model.num_decoder_layers must be at least 1 for translation (Transformer-base: 6)")
        train = load_split(data, "train")
        if train is None:
            raise DataError("no training data: set data.train_prefix (line-aligned files) or data.hub_name (wmt14)")
        train = first(train, data.max_train_samples)
        valid = load_split(data, "valid")
        if valid is None:
            raise DataError("no dev set: set data.valid_prefix (line-aligned files) or data.hub_name (wmt14)")
        valid = first(valid, data.max_eval_samples)
        test = load_split(data, "test")
        self.test_text = first(test, data.max_eval_samples) if test is not None else None

        self.tokenizer = self._tokenizer(accelerator, run_dir, train)
        cfg.model.vocab_size = len(self.tokenizer)
        cfg.model.pad_token_id = self.tokenizer.pad_token_id
        if accelerator.is_main_process:
            self.tokenizer.save_pretrained(run_dir / "tokenizer")

        self.train_split = self._training_split(train)
        self.valid_split = self._eval_split(valid)

    def _tokenizer(self, accelerator, run_dir: Path, train: ParallelText) -> PreTrainedTokenizerFast:
        data, cfg = self.data, self.cfg
        if data.tokenizer:
            return load_tokenizer(data.tokenizer, "data.tokenizer")
        if cfg.train.resume_from and (run_dir / "tokenizer" / "tokenizer.json").is_file():
            return load_tokenizer(run_dir / "tokenizer", "tokenizer")  # a resumed run keeps its vocabulary
        with accelerator.main_process_first():
            return train_joint_bpe(itertools.chain(train.source, train.target), data.bpe_vocab_size)

    def _training_split(self, text: ParallelText) -> Split:
        data = self.data
        source = TokenArrays.encode(self.tokenizer, text.source)
        target = TokenArrays.encode(self.tokenizer, text.target)
        keep = keep_pairs(source.lengths, target.lengths, data)
        if keep.size == 0:
            raise DataError(
                f"{text.origin}: no training pair is left after the length filters "
                f"(data.max_source_length={data.max_source_length}, data.max_target_length={data.max_target_length}, "
                f"data.max_length_ratio={data.max_length_ratio})"
            )
        self._print(f"training pairs: {keep.size} of {len(source)} kept by the length filters ({text.origin})")
        source, target = source.subset(keep), target.subset(keep)
        order = length_sorted(source.lengths, target.lengths, self.cfg.train.seed)
        sizes = np.maximum(source.lengths, target.lengths)
        return Split(text, source, target, token_batches(order, sizes, data.max_tokens))

    def _eval_split(self, text: ParallelText) -> Split:
        """Every pair kept (BLEU is over the whole set); sources and targets cut to the maximum lengths.
        Batches of similar length in a fixed shuffled order, so a capped evaluation sees every length."""
        data = self.data
        source = TokenArrays.encode(self.tokenizer, text.source, data.max_source_length)
        target = TokenArrays.encode(self.tokenizer, text.target, data.max_target_length)
        order = np.argsort(source.lengths, kind="stable")
        batches = token_batches(order, np.maximum(source.lengths, target.lengths), data.max_tokens)
        np.random.default_rng(self.cfg.train.seed).shuffle(batches)
        return Split(text, source, target, batches)

    def _loader(self, split: Split, shuffle: bool) -> DataLoader:
        collate = PairCollator(split.source, split.target, self.tokenizer.pad_token_id, self.tokenizer.bos_token_id)
        return DataLoader(
            split.batches, batch_size=1, shuffle=shuffle, collate_fn=collate, num_workers=self.cfg.train.num_workers
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_split, shuffle=True)

    def eval_dataloader(self) -> DataLoader:
        return self._loader(self.valid_split, shuffle=False)

    # ---------------------------------------------------------------------------------------------
    # Model and loss
    # ---------------------------------------------------------------------------------------------

    def build_model(self) -> RoFormerForSeq2SeqLM:
        if self.cfg.init_from:
            model = load_pretrained(self.cfg.init_from)
            if not isinstance(model, RoFormerForSeq2SeqLM):
                raise DataError(f"init_from={self.cfg.init_from}: holds a {type(model).__name__}, not a seq2seq model")
            return model
        return RoFormerForSeq2SeqLM(self.cfg.model)

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
            splits.append(("test", "test", accelerator.prepare(self._loader(test_split, False)), test_split))
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

    def save_artifacts(self, path: Path) -> None:
        self.tokenizer.save_pretrained(path)

    def _print(self, message: str) -> None:
        if self.accelerator.is_main_process:
            print(message)
