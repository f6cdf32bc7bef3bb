"""GLUE fine-tuning: the nine tasks, read from the hub or from GLUE's original TSV files; sentence-pair encoding
with token types; dev metrics during training; test predictions in the GLUE submission format.

Local files (`data.data_dir`) follow the layout of GLUE's download script: `<root>/<Task>/train.tsv`, `dev.tsv`
(`dev_matched.tsv` and `dev_mismatched.tsv` for MNLI) and `test.tsv` (`test_matched.tsv`, `test_mismatched.tsv`),
each with that task's own columns (CoLA's train/dev have no header row). `data.data_dir` may also name the task's
folder itself. TSVs are read with `csv.QUOTE_NONE` because GLUE text holds unbalanced quotes; a row with the
wrong number of fields is skipped with a warning naming the file and line, as GLUE's own readers do. Local files
need no `datasets` package: only hub names import it.

One alternate layout is supported, `data.layout=mnli_sample`: TextFooler's MNLI dev samples (files `mnli_matched`
and `mnli_mismatched`, rows `label<TAB>premise<TAB>hypothesis`, no header). It holds dev data only, so it can be
read and evaluated on, but a run still needs MNLI's train.tsv in the same folder.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from roformer.config import GLUEDataConfig, RunConfig
from roformer.errors import ConfigError, DataError
from roformer.metrics import compute_metrics
from roformer.modeling import RoFormerForSequenceClassification, RoFormerModel, load_pretrained
from roformer.positions import scheme_class
from roformer.tasks.base import Task
from roformer.tokenization import train_wordpiece

BUCKET_WINDOW = 50  # batches sorted together by length: less padding, order still random across windows

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# The nine tasks
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """One evaluation or test split: its TSV file, its name on the hub, and its name in our outputs."""

    tsv: str
    hub: str
    name: str
    """Dev: the suffix of its metric keys ('' or '_mm'); test: the stem of its submission file ('RTE', 'MNLI-m')."""


@dataclass(frozen=True)
class GLUESpec:
    name: str
    """Config name, also the hub's config name (nyu-mll/glue)."""
    directory: str
    """Folder name in GLUE's download (CoLA, SST-2, ...)."""
    text_columns: tuple[str, str | None]
    """TSV columns of sentence A and B (None: a single-sentence task)."""
    label_column: str
    label_names: tuple[str, ...] | None
    """Labels in the hub's id order, written as GLUE expects them in a submission; None: regression."""
    metrics: tuple[str, ...]
    test: tuple[Split, ...]
    dev: tuple[Split, ...] = (Split("dev.tsv", "validation", ""),)
    hub_columns: tuple[str, str | None] | None = None
    """The hub's names for the text columns, when they differ from the TSV's."""
    headerless_columns: tuple[str, ...] | None = None
    """Column names of train/dev files that have no header row (CoLA)."""
    index_column: str = "index"
    """The id column of test files, echoed in the submission."""

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)


def _test(stem: str) -> tuple[Split, ...]:
    return (Split("test.tsv", "test", stem),)


BINARY = ("0", "1")
ENTAILMENT = ("entailment", "not_entailment")
PAIR = ("sentence1", "sentence2")

# fmt: off
# One row per task: name, GLUE folder, TSV text columns, label column, label names, metrics, test file(s).
GLUE_TASKS: dict[str, GLUESpec] = {spec.name: spec for spec in (
    GLUESpec("cola", "CoLA", ("sentence", None), "label", BINARY, ("mcc",), _test("CoLA"),
             headerless_columns=("source", "label", "original_label", "sentence")),
    GLUESpec("sst2", "SST-2", ("sentence", None), "label", BINARY, ("accuracy",), _test("SST-2")),
    GLUESpec("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", BINARY, ("accuracy", "f1"), _test("MRPC"),
             hub_columns=PAIR),
    GLUESpec("stsb", "STS-B", PAIR, "score", None, ("pearson", "spearman"), _test("STS-B")),
    GLUESpec("qqp", "QQP", ("question1", "question2"), "is_duplicate", BINARY, ("accuracy", "f1"), _test("QQP"),
             index_column="id"),
    GLUESpec("mnli", "MNLI", PAIR, "gold_label", ("entailment", "neutral", "contradiction"), ("accuracy",),
             test=(Split("test_matched.tsv", "test_matched", "MNLI-m"),
                   Split("test_mismatched.tsv", "test_mismatched", "MNLI-mm")),
             dev=(Split("dev_matched.tsv", "validation_matched", ""),
                  Split("dev_mismatched.tsv", "validation_mismatched", "_mm")),
             hub_columns=("premise", "hypothesis")),
    GLUESpec("qnli", "QNLI", ("question", "sentence"), "label", ENTAILMENT, ("accuracy",), _test("QNLI")),
    GLUESpec("rte", "RTE", PAIR, "label", ENTAILMENT, ("accuracy",), _test("RTE")),
    GLUESpec("wnli", "WNLI", PAIR, "label", BINARY, ("accuracy",), _test("WNLI")),
)}
# fmt: on

# TextFooler's MNLI dev samples (../shared/data/glue/MNLI_sample): headerless label, premise, hypothesis
MNLI_SAMPLE_COLUMNS = ("gold_label", "sentence1", "sentence2")
MNLI_SAMPLE_DEV = (
    Split("mnli_matched", "validation_matched", ""),
    Split("mnli_mismatched", "validation_mismatched", "_mm"),
)


# --------------------------------------------------------------------------------------------------
# Reading GLUE's TSV files
# --------------------------------------------------------------------------------------------------


@dataclass
class TSVTable:
    path: Path
    columns: list[str]
    rows: list[tuple[int, list[str]]]
    """(line number, fields) of each well-formed row."""
    malformed: list[tuple[int, int]]
    """(line number, field count) of each row skipped for having the wrong number of fields."""

    def column(self, name: str) -> int:
        if name not in self.columns:
            raise DataError(f"{self.path}: no column '{name}' (columns: {', '.join(self.columns)})")
        return self.columns.index(name)


def read_tsv(path: str | Path, columns: tuple[str, ...] | None = None) -> TSVTable:
    """A GLUE TSV: the first row is the header unless `columns` names the columns of a file without one.

    Quotes are plain text (csv.QUOTE_NONE), so one line is one row. A row whose field count differs from the
    header's is skipped and reported with its line; a missing, empty or non-UTF-8 file is a DataError.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows, malformed = [], []
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:  # -sig: MRPC's files start with a byte-order mark
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = list(columns) if columns else next(reader, None)
            if not header:
                raise DataError(f"{path}: file is empty")
            for fields in reader:
                if not fields:
                    continue  # a blank line, e.g. at the end
                if len(fields) != len(header):
                    malformed.append((reader.line_num, len(fields)))
                else:
                    rows.append((reader.line_num, fields))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 ({err.reason} at byte {err.start})") from None
    if malformed:
        shown = ", ".join(f"line {line} has {n}" for line, n in malformed[:5])
        more = f" and {len(malformed) - 5} more" if len(malformed) > 5 else ""
        logger.warning(
            f"{path}: skipped {len(malformed)} malformed row(s) (expected {len(header)} tab-separated fields): "
            f"{shown}{more}"
        )
    return TSVTable(path, header, rows, malformed)


def parse_label(value: str, spec: GLUESpec, path: Path, line: int) -> int | float:
    """A label as written in the file -> class id (classification) or float score (STS-B)."""
    if spec.label_names is None:
        try:
            return float(value)
        except ValueError:
            raise DataError(f"{path}: line {line}: score {value!r} is not a number") from None
    if value not in spec.label_names:
        raise DataError(f"{path}: line {line}: label {value!r} is not one of {', '.join(spec.label_names)}")
    return spec.label_names.index(value)


def table_examples(table: TSVTable, spec: GLUESpec, labelled: bool) -> list[dict]:
    """Rows -> examples {'idx', 'text_a'[, 'text_b'][, 'labels']}; test rows keep the file's own index."""
    a = table.column(spec.text_columns[0])
    b = table.column(spec.text_columns[1]) if spec.text_columns[1] else None
    label = table.column(spec.label_column) if labelled else None
    index = None if labelled else table.column(spec.index_column)
    examples = []
    for position, (line, fields) in enumerate(table.rows):
        example = {"idx": position, "text_a": fields[a]}
        if b is not None:
            example["text_b"] = fields[b]
        if label is not None:
            example["labels"] = parse_label(fields[label], spec, table.path, line)
        if index is not None:
            try:
                example["idx"] = int(fields[index])
            except ValueError:
                raise DataError(f"{table.path}: line {line}: index {fields[index]!r} is not an integer") from None
        examples.append(example)
    return examples


class EncodedExamples(torch.utils.data.Dataset):
    """Tokenized examples held as columns of equal length: `ds[i]` is example i as a dict (what
    DataCollatorWithPadding takes), `ds["input_ids"]` a whole column."""

    def __init__(self, columns: dict[str, list]):
        self.columns = columns
        self.length = len(next(iter(columns.values()), []))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key):
        if isinstance(key, str):
            return self.columns[key]
        return {name: values[key] for name, values in self.columns.items()}

    def remove_columns(self, *names: str) -> EncodedExamples:
        return EncodedExamples({k: v for k, v in self.columns.items() if k not in names})


@dataclass
class GLUEData:
    """Examples of one task: the training set, the dev sets (metric suffix, examples), the test sets
    (submission stem, examples). MNLI has two dev and two test sets, every other task one of each."""

    train: list[dict]
    dev: list[tuple[str, list[dict]]]
    test: list[tuple[str, list[dict]]]


def find_task_folder(data_dir: str | Path, spec: GLUESpec, layout: str) -> Path:
    """`data_dir` is a GLUE root (holding <Task>/ or <Task>_sample/) or the task's own folder."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data.data_dir={data_dir}: directory not found")
    names = [spec.directory, spec.directory + "_sample"]
    if layout == "mnli_sample":
        names.reverse()
    for name in names:
        if (root / name).is_dir():
            return root / name
    first_dev = (MNLI_SAMPLE_DEV if layout == "mnli_sample" else spec.dev)[0].tsv
    if (root / first_dev).is_file():
        return root
    raise DataError(
        f"data.data_dir={data_dir}: no {spec.directory}/ folder and no {first_dev} here "
        f"(point data.data_dir at the GLUE root or at the {spec.directory} folder)"
    )


def layout_spec(spec: GLUESpec, layout: str) -> GLUESpec:
    """The task as laid out on disk: GLUE's own files, or the mnli_sample files (dev only, no test)."""
    if layout == "glue":
        return spec
    if spec.name != "mnli":
        raise ConfigError(f"data.layout=mnli_sample is for data.task_name=mnli, not {spec.name}")
    return dataclasses.replace(spec, headerless_columns=MNLI_SAMPLE_COLUMNS, dev=MNLI_SAMPLE_DEV, test=())


def load_local(data: GLUEDataConfig, spec: GLUESpec) -> GLUEData:
    """The task's examples from GLUE's TSV files, or from the mnli_sample layout (whose train set is empty
    unless GLUE's MNLI train.tsv lies beside the samples)."""
    folder = find_task_folder(data.data_dir, spec, data.layout)
    sample_files_only = (folder / "mnli_matched").is_file() and not (folder / "dev_matched.tsv").is_file()
    if data.layout == "glue" and spec.name == "mnli" and sample_files_only:
        raise DataError(f"{folder}: holds mnli_matched/mnli_mismatched, not GLUE's files; set data.layout=mnli_sample")
    spec = layout_spec(spec, data.layout)

    def labelled(file: str, columns: tuple[str, ...] | None) -> list[dict]:
        return table_examples(read_tsv(folder / file, columns), spec, labelled=True)

    dev = [(split.name, labelled(split.tsv, spec.headerless_columns)) for split in spec.dev]
    if data.layout == "mnli_sample":  # GLUE's MNLI train.tsv, with its header, if it is there
        train = labelled("train.tsv", None) if (folder / "train.tsv").is_file() else []
    else:
        train = labelled("train.tsv", spec.headerless_columns)
    test = []
    for split in spec.test:
        if (folder / split.tsv).is_file():  # test files are optional: without one, no submission file
            test.append((split.name, table_examples(read_tsv(folder / split.tsv), spec, labelled=False)))
        else:
            logger.warning(f"{folder / split.tsv}: not found; no {split.name}.tsv submission will be written")
    return GLUEData(train, dev, test)


def load_hub(data: GLUEDataConfig, spec: GLUESpec) -> GLUEData:
    """The task's examples from the hub (`nyu-mll/glue`, config = the task name)."""
    import datasets

    try:
        splits = datasets.load_dataset(data.hub_name, spec.name)
    except Exception as err:  # the hub is a user's input: one line, and the offline alternative
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"data.hub_name={data.hub_name}: could not load GLUE task {spec.name!r} ({reason}); "
            "for local GLUE files set data.data_dir"
        ) from None

    def examples(split: str, labelled: bool) -> list[dict]:
        a, b = spec.hub_columns or spec.text_columns
        out = []
        for row in splits[split]:
            example = {"idx": row["idx"], "text_a": row[a]}
            if b:
                example["text_b"] = row[b]
            if labelled:
                example["labels"] = row["label"]
            out.append(example)
        return out

    return GLUEData(
        examples("train", True),
        [(s.name, examples(s.hub, True)) for s in spec.dev],
        [(s.name, examples(s.hub, False)) for s in spec.test if s.hub in splits],
    )


# --------------------------------------------------------------------------------------------------
# Initial weights
# --------------------------------------------------------------------------------------------------


def load_encoder(path: Path) -> tuple[RoFormerModel, dict[str, torch.Tensor] | None]:
    """The encoder of the checkpoint at `path`, and BERT's pooler weights if it has trained ones.

    Our own save_pretrained directories hold any encoder model (masked LM, classifier, bare encoder);
    transformers BERT/RoFormer directories are loaded with transformers (their base model, whatever head was
    saved) and converted key by key with `from_transformers`.
    """
    meta = json.loads((path / "config.json").read_text())
    if "architecture" in meta:
        model = load_pretrained(path)
        encoder = model if isinstance(model, RoFormerModel) else getattr(model, "roformer", None)
        if encoder is None:
            raise DataError(f"init_from={path}: holds a {meta['architecture']}, which has no encoder to fine-tune")
        return encoder, None
    family = meta.get("model_type")
    if family not in ("bert", "roformer"):
        raise DataError(f"init_from={path}: a transformers {family!r} checkpoint; supported: bert, roformer")
    import transformers

    from roformer.interop import from_transformers

    base = transformers.BertModel if family == "bert" else transformers.RoFormerModel
    hf_model, info = base.from_pretrained(str(path), output_loading_info=True)
    encoder = from_transformers(hf_model)
    pooler = None
    trained_pooler = not any(key.startswith("pooler.") for key in info["missing_keys"])
    if family == "bert" and getattr(hf_model, "pooler", None) is not None and trained_pooler:
        # BertForSequenceClassification starts its head from the pretrained pooler; so does ours (tanh head)
        pooler = {k: v.detach().clone() for k, v in hf_model.pooler.dense.state_dict().items()}
    return encoder, pooler


# --------------------------------------------------------------------------------------------------
# Submission files
# --------------------------------------------------------------------------------------------------


def write_submission(path: Path, indices: list[int], predictions: list[str]) -> None:
    """GLUE's format: a header `index<TAB>prediction`, then one row per test example in index order."""
    rows = sorted(zip(indices, predictions))
    path.write_text("index\tprediction\n" + "".join(f"{i}\t{p}\n" for i, p in rows), encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------


class GLUETask(Task):
    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.data: GLUEDataConfig = cfg.data
        self.spec = GLUE_TASKS[self.data.task_name]
        self.pooler: dict[str, torch.Tensor] | None = None

    # ---- set-up --------------------------------------------------------------------------------

    def setup(self, accelerator, run_dir: Path) -> None:
        data = self.data
        self.load_init_from()  # a typo fails before any download; the checkpoint's architecture goes to cfg.model
        examples = load_local(data, self.spec) if data.data_dir else load_hub(data, self.spec)
        train = examples.train[: data.max_train_samples]
        dev = [(name, ex[: data.max_eval_samples]) for name, ex in examples.dev]
        if not train:
            hint = " (data.layout=mnli_sample holds dev samples only)" if data.layout == "mnli_sample" else ""
            raise DataError(f"GLUE {self.spec.name}: no training examples{hint}")
        if not all(ex for _, ex in dev):
            raise DataError(f"GLUE {self.spec.name}: a dev set has no examples")

        def wordpiece():  # from scratch: a WordPiece vocabulary of the task's own training text
            texts = [ex["text_a"] for ex in train] + [ex["text_b"] for ex in train if "text_b" in ex]
            return train_wordpiece(texts, data.tokenizer_vocab_size, data.max_seq_length)

        self.resolve_tokenizer(accelerator, run_dir, wordpiece)
        self._check_model_fits()

        with accelerator.main_process_first():
            self.train_set = self._encode(train)
            self.dev_sets = [(name, self._encode(ex)) for name, ex in dev]
            self.test_sets = [(name, self._encode(ex)) for name, ex in examples.test]

    def read_init_model(self, path: Path) -> RoFormerModel:
        """The checkpoint's encoder (ours or a transformers BERT/RoFormer); BERT's trained pooler is kept aside."""
        encoder, self.pooler = load_encoder(path)
        return encoder

    def _check_model_fits(self) -> None:
        model, data = self.cfg.model, self.data
        if len(self.tokenizer) > model.vocab_size:
            raise DataError(
                f"the tokenizer has {len(self.tokenizer)} tokens but the model's vocabulary has {model.vocab_size}"
            )
        longest = scheme_class(model.position).max_length(model)  # a learned table's rows, or None
        if longest is not None and data.max_seq_length > longest:
            raise ConfigError(
                f"data.max_seq_length={data.max_seq_length} exceeds the learned position table "
                f"(model.max_position_embeddings={model.max_position_embeddings})"
            )

    def _encode(self, examples: list[dict]) -> EncodedExamples:
        """Examples -> input_ids, token_type_ids, attention_mask (unpadded), idx[, labels], one batch call of the
        fast tokenizer over every text (no `datasets` needed: GLUE sets fit in memory many times over)."""
        text_b = [ex["text_b"] for ex in examples] if examples and "text_b" in examples[0] else None  # None: single
        encoded = self.tokenizer(
            [ex["text_a"] for ex in examples],
            text_b,
            truncation=True,
            max_length=self.data.max_seq_length,
            return_token_type_ids=True,
        )
        columns = {key: list(values) for key, values in encoded.items()}
        for key in ("idx", "labels"):
            if examples and key in examples[0]:
                columns[key] = [ex[key] for ex in examples]
        return EncodedExamples(columns)

    # ---- model and data ------------------------------------------------------------------------

    def build_model(self) -> RoFormerForSequenceClassification:
        model = RoFormerForSequenceClassification(self.cfg.model, num_labels=self.spec.num_labels)
        self.initial_weights(model.roformer)  # pretrained encoder, fresh classification head
        if self.pooler is not None:
            model.classifier.dense.load_state_dict(self.pooler)
            self.pooler = None
        return model

    def _loader(self, dataset, shuffle: bool = False) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.cfg.train.per_device_batch_size,
            shuffle=shuffle,
            collate_fn=DataCollatorWithPadding(self.tokenizer),  # pads each batch to its longest row
            num_workers=self.cfg.train.num_workers,
        )

    def train_dataset(self):
        return self.train_set.remove_columns("idx")

    def train_collator(self) -> DataCollatorWithPadding:
        return DataCollatorWithPadding(self.tokenizer)  # pads each batch to its longest row

    def epoch_batches(self, epoch: int, batch_size: int) -> list[np.ndarray]:
        """Batches of similar lengths, so little of each is padding: the examples in a seeded random order, sorted
        by length within windows of BUCKET_WINDOW batches, cut into batches, and the batches shuffled."""
        if getattr(self, "_train_lengths", None) is None:
            self._train_lengths = np.fromiter(map(len, self.train_set["input_ids"]), dtype=np.int64)
        rng = np.random.default_rng([self.cfg.train.seed, epoch])
        order = rng.permutation(len(self._train_lengths))
        window = batch_size * BUCKET_WINDOW
        for start in range(0, len(order), window):
            chunk = order[start : start + window]
            order[start : start + window] = chunk[np.argsort(self._train_lengths[chunk], kind="stable")]
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def eval_dataloader(self) -> DataLoader:
        """The first dev set (MNLI: matched); final_evaluation adds the others."""
        return self._loader(self.dev_sets[0][1])

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], labels=batch["labels"]).loss

    # ---- evaluation ----------------------------------------------------------------------------

    def _predict(self, model, dataloader, accelerator, max_batches: int | None = None) -> dict[str, torch.Tensor]:
        """Logits (N, num_labels), idx (N,) and, for labelled sets, labels (N,) over all processes."""
        parts: dict[str, list[torch.Tensor]] = {}
        for i, batch in enumerate(dataloader):
            if max_batches is not None and i >= max_batches:
                break
            logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits.float()
            keep = {"logits": logits, "idx": batch["idx"]}
            if "labels" in batch:
                keep["labels"] = batch["labels"]
            for key, value in accelerator.gather_for_metrics(keep).items():
                parts.setdefault(key, []).append(value.cpu())
        return {key: torch.cat(values) for key, values in parts.items()}

    def evaluate(self, model, dataloader, accelerator, max_batches: int | None = None) -> dict[str, float]:
        out = self._predict(model, dataloader, accelerator, max_batches)
        logits, labels = out["logits"], out["labels"]
        if self.spec.num_labels == 1:
            predictions = logits.squeeze(-1)
            loss = F.mse_loss(predictions, labels.float())
        else:
            predictions = logits.argmax(-1)
            loss = F.cross_entropy(logits, labels)
        return {"loss": loss.item(), **compute_metrics(self.spec.metrics, predictions.numpy(), labels.numpy())}

    def _prediction_labels(self, logits: torch.Tensor) -> list[str]:
        """Logits (N, num_labels) -> what GLUE expects: a label name, or an STS-B score in its 0-5 range."""
        if self.spec.label_names is None:
            return [f"{score:.3f}" for score in logits.squeeze(-1).clamp(0.0, 5.0).tolist()]
        return [self.spec.label_names[i] for i in logits.argmax(-1).tolist()]

    def final_evaluation(self, model, dataloader, accelerator, run_dir: Path) -> dict[str, Any]:
        """Metrics on every dev set (MNLI: `eval/accuracy` matched, `eval/accuracy_mm` mismatched), and a
        GLUE submission file `<Task>.tsv` per test set in `run_dir`."""
        results = {}
        for position, (suffix, dataset) in enumerate(self.dev_sets):
            loader = dataloader if position == 0 else accelerator.prepare(self._loader(dataset))
            results.update({f"eval/{k}{suffix}": v for k, v in self.evaluate(model, loader, accelerator).items()})
        for stem, dataset in self.test_sets:
            out = self._predict(model, accelerator.prepare(self._loader(dataset)), accelerator)
            if accelerator.is_main_process:
                write_submission(run_dir / f"{stem}.tsv", out["idx"].tolist(), self._prediction_labels(out["logits"]))
                accelerator.print(f"test predictions: {run_dir / f'{stem}.tsv'} ({len(out['idx'])} rows)")
        return results
