"""Typed configs: one dataclass per concern, YAML recipes loaded into them, dotted overrides type-checked.

A recipe is a YAML mapping with the keys of `RunConfig`. `load_config(path, overrides)` returns a
`RunConfig`; an unknown key, a wrong type or a value outside its choices raises `ConfigError` whose
message names the key, where it came from (the file or the command line) and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from roformer.errors import ConfigError
from roformer.positions import POSITION_SCHEMES, scheme_class

PositionName = Literal[tuple(POSITION_SCHEMES)]  # the registered schemes, in registry order
GLUETaskName = Literal["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]


@dataclass
class ModelConfig:
    """The encoder (and, for translation, the decoder). Field names follow BERT/RoFormer where they can."""

    vocab_size: int = 30522
    """Rows of the word embedding; a run sets it from its tokenizer."""
    hidden_size: int = 768
    num_layers: int = 12
    """Encoder layers."""
    num_heads: int = 12
    intermediate_size: int = 3072
    """Width of the feed-forward layer."""
    max_position_embeddings: int = 512
    """Rows of the learned table; for rotary the trained length that RoPE scaling extends from."""
    embedding_size: int | None = None
    """Width of the embeddings when it differs from hidden_size (projected up, as in HF RoFormer)."""
    type_vocab_size: int = 2
    position: PositionName = "rotary"
    """The position scheme (roformer/positions.py): rotary (RoPE, the paper), sinusoidal (Vaswani), learned
    (BERT), alibi (Press et al.), t5_relative (T5's bucketed bias) or none."""
    rotary_pairing: Literal["interleaved", "half"] = "interleaved"
    """interleaved: pairs (x[2i], x[2i+1]) as in the paper and HF RoFormer; half: Llama/GPT-NeoX."""
    rope_base: float = 10000.0
    rope_scaling: Literal["none", "linear", "ntk", "dynamic_ntk", "yarn"] = "none"
    """Context extension beyond max_position_embeddings (rotary only)."""
    rope_scaling_factor: float = 1.0
    relative_attention_num_buckets: int = 32
    """t5_relative: buckets of key - query offsets per direction pair (T5: 32)."""
    relative_attention_max_distance: int = 128
    """t5_relative: offsets from here on share the last bucket (T5: 128)."""
    rotary_value: bool = False
    """Rotate the values too, as transformers' RoFormer optionally does."""
    attention: Literal["softmax", "linear"] = "softmax"
    """softmax attention, or the paper's linear attention (sec. 3.3)."""
    attention_impl: Literal["sdpa", "eager"] = "sdpa"
    """sdpa: torch's fused kernels; eager: the same maths written out, returns attention weights."""
    linear_feature_map: Literal["elu", "favor"] = "elu"
    """phi for linear attention: elu(x) + 1, or Performer's positive random features."""
    hidden_act: str = "gelu"
    classifier_activation: str = "gelu"
    """gelu as in HF RoFormer's classification head; tanh as in BERT's pooler."""
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    num_decoder_layers: int = 0
    """Decoder layers of the encoder-decoder (translation); 0 for an encoder only."""
    embedding_layer_norm: bool = True
    """LayerNorm after the embeddings (BERT, RoFormer); the original Transformer has none."""
    scale_embeddings: bool | None = None
    """Multiply token embeddings by sqrt(hidden_size), as Vaswani et al. do. Unset means the scheme's default
    (on for sinusoidal only: its fixed table has unit amplitude, and unscaled std-0.02 word embeddings drown
    under it after the embedding LayerNorm; the run stalls on the unigram plateau, docs/results.md section 1)."""
    tie_word_embeddings: bool = True

    def __post_init__(self):
        scheme = scheme_class(self.position)
        if self.scale_embeddings is None:
            self.scale_embeddings = scheme.scales_embeddings
        if self.num_heads < 1:  # before the modulo below
            raise ConfigError(f"model.num_heads must be at least 1, got {self.num_heads}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} must be a multiple of model.num_heads={self.num_heads}"
            )
        if self.rope_scaling_factor < 1.0:
            raise ConfigError(f"model.rope_scaling_factor must be >= 1, got {self.rope_scaling_factor}")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        scheme.validate(self)

    @property
    def embedding_dim(self) -> int:
        return self.embedding_size or self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class SourceConfig:
    """One more pretraining corpus, mixed in with a weight (data.sources)."""

    files: list[str] = field(default_factory=list)
    """Local .txt / .jsonl / .parquet files (optionally .gz), directories or globs."""
    hub_name: str | None = None
    hub_config: str | None = None
    split: str = "train"
    text_column: str = "text"
    weight: float = 1.0
    """2.0 reads the corpus twice, 0.5 every other document (fairseq-style upsampling)."""

    def __post_init__(self):
        if bool(self.files) == bool(self.hub_name):
            raise ConfigError("data.sources: each source names either files or a hub_name")
        if self.weight <= 0:
            raise ConfigError(f"data.sources: weight must be positive, got {self.weight}")


@dataclass
class MLMDataConfig:
    """Masked-LM pretraining text. Training reads a prepared dataset (`roformer prepare`): either `prepared`, or
    one made on first use from the sources into `prepared_cache` and shared by every run that asks for it."""

    corpus: Literal["builtin", "files", "hub"] = "builtin"
    """builtin: Python's own documentation (offline); files: train_files; hub: hub_name/hub_config."""
    train_files: list[str] = field(default_factory=list)
    """.txt / .jsonl / .parquet files (optionally .gz), directories or globs."""
    validation_files: list[str] = field(default_factory=list)
    """Held-out text; when empty, validation_fraction of the documents is held out (with a hub corpus, its
    validation split if it has one)."""
    validation_fraction: float = 0.2
    """Held out evenly through the corpus, by document, until max_validation_blocks blocks are held out."""
    max_validation_blocks: int = 2000
    hub_name: str | None = None
    hub_config: str | None = None
    text_column: str = "text"
    """The text column of hub rows and .jsonl / .parquet files (one document per row)."""
    sources: list[SourceConfig] = field(default_factory=list)
    """More corpora mixed in after the one above, each with a weight (e.g. Wikipedia + books)."""
    tokenizer: str | None = None
    """A tokenizer directory; when empty a WordPiece tokenizer is trained on (a sample of) the training text."""
    tokenizer_vocab_size: int = 8000
    tokenizer_sample_mb: int = 256
    """Text the tokenizer is trained on, at most: spread evenly over local files, else the first documents.
    Training holds ~3.4 bytes per byte of sample (measured, docs/results.md): 256 MB keeps it near 1 GB."""
    max_seq_length: int = 128
    """Tokens per block, [CLS] and [SEP] included: blocks are cut from the token stream, never padded."""
    mlm_probability: float = 0.15
    max_documents: int | None = None
    """Use only the first N documents (quick runs)."""
    num_proc: int | None = None
    """Processes that tokenize during preparation; default all cores."""
    prepared: str | None = None
    """A prepared dataset directory (`roformer prepare`); the source keys above are then not read. A run records the
    one it used here (absolute), made from the sources on first use or not."""
    prepared_cache: str | None = None
    """Where runs prepare raw sources; default $ROFORMER_CACHE/prepared, else ~/.cache/roformer/prepared."""

    def __post_init__(self):
        if not 0.0 < self.validation_fraction < 1.0:
            raise ConfigError(f"data.validation_fraction must be in (0, 1), got {self.validation_fraction}")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError(f"data.mlm_probability must be in (0, 1), got {self.mlm_probability}")
        if self.max_seq_length < 8:
            raise ConfigError(f"data.max_seq_length must be at least 8, got {self.max_seq_length}")
        for name in ("max_validation_blocks", "tokenizer_sample_mb", "tokenizer_vocab_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be at least 1, got {getattr(self, name)}")
        if self.num_proc is not None and self.num_proc < 1:
            raise ConfigError(f"data.num_proc must be at least 1 (or null for all cores), got {self.num_proc}")
        if self.max_documents is not None and self.max_documents < 1:
            raise ConfigError(f"data.max_documents must be at least 1 (or null), got {self.max_documents}")


@dataclass
class GLUEDataConfig:
    """One GLUE task, from a local GLUE directory (original TSV layout) or the hub."""

    task_name: GLUETaskName = "rte"
    data_dir: str | None = None
    """A GLUE directory holding <Task>/train.tsv, dev.tsv, test.tsv (e.g. ../shared/data/glue), or the task's own
    folder; when empty, hub_name is used."""
    hub_name: str = "nyu-mll/glue"
    tokenizer: str | None = None
    """A tokenizer directory; by default the one saved with the initial checkpoint."""
    max_seq_length: int = 128
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    layout: Literal["glue", "mnli_sample"] = "glue"
    """glue: the official TSV files; mnli_sample: label<TAB>premise<TAB>hypothesis files mnli_matched and
    mnli_mismatched (TextFooler's 1000-row MNLI dev samples, dev only)."""
    tokenizer_vocab_size: int = 8000
    """WordPiece size when no tokenizer is given and none comes with init_from (training from scratch)."""

    def __post_init__(self):
        if self.max_seq_length < 8:
            raise ConfigError(f"data.max_seq_length must be at least 8, got {self.max_seq_length}")
        for name in ("max_train_samples", "max_eval_samples"):  # a negative N would slice off the last examples
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be at least 1 (or null), got {getattr(self, name)}")


@dataclass
class GenerationConfig:
    """Decoding settings (roformer/generation.py), defined once: generation, BLEU evaluation, the CLI and the
    translation recipe all start from these defaults."""

    beam_size: int = 4
    """Hypotheses kept per sentence (the paper: 4); 1 is greedy search."""
    length_penalty: float = 0.6
    """fairseq's lenpen: hypotheses rank by sum of log-probs / length ** length_penalty (the paper: 0.6)."""
    max_len_a: float = 0.0
    max_len_b: int = 200
    """A translation has at most max_len_a * source length + max_len_b tokens (fairseq-generate: 0 and 200)."""
    min_length: int = 0
    """EOS is not generated before this many tokens."""

    def __post_init__(self):
        if self.beam_size < 1:
            raise ConfigError(f"beam_size must be at least 1, got {self.beam_size}")
        if self.max_len_a < 0 or self.max_len_b < 0 or self.min_length < 0:
            raise ConfigError(
                f"max_len_a={self.max_len_a}, max_len_b={self.max_len_b} and min_length={self.min_length} "
                "must not be negative"
            )

    def replace(self, **changes) -> GenerationConfig:
        """A copy with `changes` (setting names as keywords); an unknown name is a TypeError."""
        return dataclasses.replace(self, **changes) if changes else self


@dataclass
class TranslationDataConfig:
    """Line-aligned parallel text, or the hub's wmt14. Training reads a prepared dataset (`roformer prepare`):
    either `prepared`, or one made on first use from train_prefix / hub_name into `prepared_cache`. Dev and test
    sets are small and are read and tokenized at start."""

    prepared: str | None = None
    """A prepared translation dataset directory (`roformer prepare`); train_prefix / hub_name's training split
    are then not read."""
    prepared_cache: str | None = None
    """Where runs prepare raw sources; default $ROFORMER_CACHE/prepared, else ~/.cache/roformer/prepared."""
    source_lang: str = "en"
    target_lang: str = "de"
    train_prefix: str | None = None
    """Path prefix of the training files: <prefix>.<source_lang> and <prefix>.<target_lang>."""
    valid_prefix: str | None = None
    """Dev set (BLEU during training); when empty with hub_name, the hub's validation split (newstest2013)."""
    test_prefix: str | None = None
    """Translated and scored at the end; when empty with hub_name, the hub's test split (newstest2014)."""
    hub_name: str | None = None
    """A hub dataset with a `translation` column (wmt14), used when train_prefix is empty."""
    hub_config: str = "de-en"
    tokenizer: str | None = None
    """A tokenizer directory; when empty a joint BPE is trained on both sides of (a sample of) the training text."""
    bpe_vocab_size: int = 37000
    tokenizer_sample_mb: int = 256
    """Training text the BPE is learned from, at most: spread evenly over local files, else the first pairs."""
    num_proc: int | None = None
    """Processes that tokenize during preparation; default all cores."""
    max_tokens: int = 4096
    """Batch size in tokens as fairseq's --max-tokens counts them: sentences x the longest side (source or
    target, EOS included) of the longest pair, per process and micro-batch."""
    max_source_length: int = 256
    """Training pairs with a longer side (BPE tokens with EOS) are dropped; dev/test sources are truncated."""
    max_target_length: int = 256
    max_length_ratio: float = 1.5
    """Training pairs whose BPE lengths differ by more than this ratio are dropped (Moses clean-corpus-n)."""
    max_train_samples: int | None = None
    """Use only the first N training pairs (quick runs): only they are prepared (and the BPE learned from them),
    and a run on a larger prepared dataset trains on its first N."""
    max_eval_samples: int | None = None
    """Use only the first N pairs of the dev and test sets."""
    beam_size: int = GenerationConfig.beam_size
    """Beam of the final evaluation (the paper: 4); evaluation during training decodes greedily."""
    length_penalty: float = GenerationConfig.length_penalty
    """See GenerationConfig, as are max_len_a and max_len_b."""
    max_len_a: float = GenerationConfig.max_len_a
    max_len_b: int = GenerationConfig.max_len_b

    def generation(self, **changes) -> GenerationConfig:
        """This recipe's decoding settings, with `changes` (e.g. beam_size=1 for greedy evaluation)."""
        names = ("beam_size", "length_penalty", "max_len_a", "max_len_b")
        return GenerationConfig(**{name: getattr(self, name) for name in names}).replace(**changes)

    def __post_init__(self):
        for name in ("bpe_vocab_size", "max_tokens", "max_source_length", "max_target_length", "beam_size",
                     "tokenizer_sample_mb"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("num_proc", "max_train_samples", "max_eval_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be at least 1 (or null), got {getattr(self, name)}")
        if self.max_length_ratio < 1.0:
            raise ConfigError(f"data.max_length_ratio must be at least 1, got {self.max_length_ratio}")
        # the decoding settings are used only at evaluation, after the training: checked now, by their keys
        if not (math.isfinite(self.max_len_a) and self.max_len_a >= 0) or self.max_len_b < 0:
            raise ConfigError(
                f"data.max_len_a={self.max_len_a} and data.max_len_b={self.max_len_b} must be numbers at least 0"
            )
        if self.max_len_a == 0 and self.max_len_b == 0:
            raise ConfigError("data.max_len_a=0 and data.max_len_b=0 allow no token at all; give a positive max_len_b")
        if not math.isfinite(self.length_penalty):
            raise ConfigError(f"data.length_penalty must be a finite number, got {self.length_penalty}")


@dataclass
class TrainConfig:
    """The shared training loop."""

    seed: int = 42
    max_steps: int = 1000
    """Optimizer steps."""
    num_epochs: int | None = None
    """When set, replaces max_steps by this many passes over the training data (GLUE's protocol: 3 epochs)."""
    global_batch_size: int | None = None
    """Examples per optimizer step over all processes (sequences for MLM and GLUE, tokens for translation): the
    per-process micro-batch and the accumulation steps follow from the number of processes, so a recipe trains
    at the same batch on 1 or 8 GPUs. Unset: per_device_batch_size x gradient_accumulation_steps (translation:
    data.max_tokens x gradient_accumulation_steps), as for one process."""
    per_device_batch_size: int = 32
    """The largest micro-batch one process holds (sequences); the run records the one it used."""
    gradient_accumulation_steps: int = 1
    """Derived from global_batch_size when that is set; the run records the one it used."""
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-6
    max_grad_norm: float = 1.0
    lr_scheduler: Literal["linear", "cosine", "inverse_sqrt", "constant"] = "linear"
    warmup_steps: int = 0
    warmup_init_lr: float = 0.0
    """Learning rate at step 0 of the warmup (fairseq starts at 1e-7)."""
    label_smoothing: float = 0.0
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    """auto: bf16 autocast on a GPU that supports it (fp32 master weights, loss in fp32), else none."""
    compile: bool = False
    """torch.compile the model (GPU runs; on a CPU compiling takes longer than short runs gain)."""
    peak_tflops: float | None = None
    """One device's peak in TFLOP/s, for train/mfu; unset: the bf16 peak of a known GPU (roformer/flops.py)."""
    eval_every: int = 200
    max_eval_batches: int | None = None
    """Cap evaluation during training to this many batches (the final evaluation is complete)."""
    log_every: int = 10
    save_every: int = 500
    keep_last: int = 3
    """Checkpoints kept on disk (the newest K)."""
    resume_from: str | None = None
    """latest, or a checkpoint directory."""
    best_metric: str | None = None
    """Keep the weights with the best value of this metric (e.g. eval/accuracy) and finish with them."""
    best_mode: Literal["max", "min"] = "max"
    average_checkpoints: int = 0
    """Finish with the mean weights of the last N checkpoints (the paper's translation recipe: 5)."""
    log_with: Literal["wandb", "tensorboard", "none"] = "wandb"
    """Tracker beside metrics.jsonl; wandb runs offline unless WANDB_MODE or an API key says otherwise."""
    project: str = "roformer"
    num_workers: int = 0

    def __post_init__(self):
        for name in (
            "max_steps",
            "per_device_batch_size",
            "gradient_accumulation_steps",
            "eval_every",
            "log_every",
            "save_every",
            "keep_last",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ConfigError(f"train.global_batch_size must be at least 1 (or null), got {self.global_batch_size}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ConfigError(f"train.num_epochs must be at least 1 (or null), got {self.num_epochs}")
        if self.average_checkpoints > self.keep_last:
            raise ConfigError(f"train.average_checkpoints={self.average_checkpoints} needs train.keep_last >= it")
        if self.learning_rate <= 0:
            raise ConfigError(f"train.learning_rate must be positive, got {self.learning_rate}")
        for name in ("seed", "warmup_steps", "num_workers", "average_checkpoints", "max_grad_norm", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be at least 0, got {getattr(self, name)}")
        if self.max_eval_batches is not None and self.max_eval_batches < 1:
            raise ConfigError(f"train.max_eval_batches must be at least 1 (or null), got {self.max_eval_batches}")
        for name in ("adam_beta1", "adam_beta2", "label_smoothing"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.adam_epsilon <= 0 or not 0.0 <= self.warmup_init_lr <= self.learning_rate:
            raise ConfigError(
                f"train.adam_epsilon must be positive (got {self.adam_epsilon}) and train.warmup_init_lr in "
                f"[0, train.learning_rate] (got {self.warmup_init_lr})"
            )


DATA_CONFIGS: dict[str, type] = {"mlm": MLMDataConfig, "glue": GLUEDataConfig, "translation": TranslationDataConfig}


@dataclass
class RunConfig:
    """One run: which task, where its outputs go, and the model, data and training settings."""

    task: Literal["mlm", "glue", "translation"] = "mlm"
    output_dir: str = "runs/default"
    init_from: str | None = None
    """Start from these weights: a run's final/ directory or a transformers checkpoint directory."""
    overwrite: bool = False
    """Replace the outputs of a run already in output_dir (otherwise refused, unless resuming)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: Any = field(default_factory=MLMDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------------
# Building dataclasses from plain mappings, with errors that name the key and its origin
# --------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, origin: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    kind = typing.get_origin(tp)
    bad = ConfigError(f"{origin}: {key}={value!r} is not allowed; expected {_type_name(tp)}")
    if tp is Any:
        return value
    if kind is Literal:
        if value is False and "no" in typing.get_args(tp):
            value = "no"  # YAML 1.1 reads a bare `no` (e.g. train.mixed_precision=no) as false
        if value not in typing.get_args(tp):
            raise bad
        return value
    if kind in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key, origin)
            except ConfigError:
                continue
        raise bad
    if tp is type(None):
        if value is not None:
            raise bad
        return None
    if kind is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):  # one path on the command line is a list of one
            value = [value]
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, item_tp, f"{key}[{i}]", origin) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key, origin)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise bad


def build_dataclass(cls: type, raw: Any, prefix: str = "", origin: str = "config"):
    """Build `cls` from a mapping; unknown keys, wrong types and bad choices raise ConfigError."""
    where = prefix or "the top level"
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: {where} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"{origin}: unknown key '{dotted}'; allowed keys in {where}: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], dotted, origin)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{origin}: {err}") from None


def parse_overrides(overrides: list[str]) -> dict:
    """['model.position=sinusoidal', 'train.max_steps=200'] -> nested dict with YAML-typed values."""
    nested: dict = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"command line: override {item!r} is not of the form dotted.key=value")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command line: override {item!r} sets a key below a value")
        node[leaf] = value
    return nested


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        at = f" line {line + 1}" if line is not None else ""
        raise ConfigError(f"{path}:{at} is not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping of keys to values")
    return raw


def config_from_dict(raw: dict, origin: str = "config") -> RunConfig:
    raw = dict(raw)
    task = raw.get("task", "mlm")
    if task not in DATA_CONFIGS:
        raise ConfigError(f"{origin}: task={task!r} is not allowed; expected one of {', '.join(DATA_CONFIGS)}")
    data = build_dataclass(DATA_CONFIGS[task], raw.pop("data", {}) or {}, "data", origin)
    cfg = build_dataclass(RunConfig, raw, "", origin)
    cfg.data = data
    _check_lengths_fit(cfg, origin)
    return cfg


def _check_lengths_fit(cfg: RunConfig, origin: str) -> None:
    """A scheme with a maximum length (a learned table's rows) must fit the data's sequences."""
    rows = scheme_class(cfg.model.position).max_length(cfg.model)
    if rows is None:
        return
    for name in ("max_seq_length", "max_source_length", "max_target_length"):
        length = getattr(cfg.data, name, None)
        if length is not None and length > rows:
            raise ConfigError(
                f"{origin}: data.{name}={length} is longer than model.position={cfg.model.position!r} allows "
                f"(model.max_position_embeddings={rows}); use at most {rows} or a scheme without a table"
            )
    data = cfg.data
    if hasattr(data, "max_len_b"):  # translation: the decoder's table must also hold the longest translation
        # evaluation cuts sources to max_source_length (EOS included); BOS + that many tokens are decoded
        longest = int(data.max_len_a * (data.max_source_length - 1) + data.max_len_b)
        if longest + 1 > rows:
            raise ConfigError(
                f"{origin}: data.max_len_a={data.max_len_a} and data.max_len_b={data.max_len_b} allow translations "
                f"of {longest} tokens (sources of data.max_source_length={data.max_source_length}), but "
                f"model.position={cfg.model.position!r} has {rows} positions (at most {rows - 1} tokens after BOS); "
                "lower them or use a scheme without a table"
            )


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe (or start from the defaults when path is None) and apply dotted overrides."""
    raw = _read_yaml(Path(path)) if path else {}
    origin = str(path) if path else "defaults"
    cfg = config_from_dict(raw, origin)  # the file alone first, so its own mistakes name the file
    if overrides:
        cfg = config_from_dict(_merge(raw, parse_overrides(overrides)), f"{origin} + command line")
    # not a config key: what the user set on the command line (init_from refuses model overrides it cannot apply)
    cfg.command_line = parse_overrides(overrides or [])
    return cfg


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(cfg.to_yaml(), encoding="utf-8")


def model_config_from_dict(raw: dict, origin: str = "config.json") -> ModelConfig:
    return build_dataclass(ModelConfig, raw, "model", origin)
