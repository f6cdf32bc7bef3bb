"""RoFormer: Enhanced Transformer with Rotary Position Embedding (Su et al. 2021), reproduced."""

from roformer.config import ModelConfig, RunConfig, TrainConfig, load_config
from roformer.errors import ConfigError, DataError, SequenceTooLongError, UserError
from roformer.interop import from_transformers, to_transformers
from roformer.modeling import (
    RoFormerForMaskedLM,
    RoFormerForSeq2SeqLM,
    RoFormerForSequenceClassification,
    RoFormerModel,
    load_pretrained,
)
from roformer.positions import POSITION_SCHEMES, apply_rope, rope_cos_sin, rope_inv_freq

__version__ = "0.1.0"

__all__ = [
    "POSITION_SCHEMES",
    "ConfigError",
    "DataError",
    "ModelConfig",
    "RoFormerForMaskedLM",
    "RoFormerForSeq2SeqLM",
    "RoFormerForSequenceClassification",
    "RoFormerModel",
    "RunConfig",
    "SequenceTooLongError",
    "TrainConfig",
    "UserError",
    "apply_rope",
    "from_transformers",
    "load_config",
    "load_pretrained",
    "rope_cos_sin",
    "rope_inv_freq",
    "to_transformers",
]
