"""Shared test helpers: a tiny model config factory and a fixed seed per test."""

import pytest
import torch

from roformer import ModelConfig

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_config():
    """tiny_config(**overrides) -> a ModelConfig small enough for a CPU test (head size 8)."""

    def make(**overrides) -> ModelConfig:
        return ModelConfig(**{**TINY, **overrides})

    return make
