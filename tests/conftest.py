"""Shared test helpers: a tiny model config factory, a fixed seed per test, two tiny pretrained runs."""

from pathlib import Path

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


@pytest.fixture(autouse=True, scope="session")
def _prepared_cache(tmp_path_factory):
    """Runs prepare raw-source recipes into one cache per test session (subprocesses inherit it), never ~/.cache."""
    import os

    os.environ["ROFORMER_CACHE"] = str(tmp_path_factory.mktemp("roformer_cache"))


@pytest.fixture
def tiny_config():
    """tiny_config(**overrides) -> a ModelConfig small enough for a CPU test (head size 8)."""

    def make(**overrides) -> ModelConfig:
        return ModelConfig(**{**TINY, **overrides})

    return make


@pytest.fixture
def single_thread():
    """One intra-op thread for tiny models: two gain nothing, and on a busy machine they wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_pretrained_runs(tmp_path_factory):
    """Two real pretraining runs (rotary, learned) of a few steps on Shakespeare, length 32: [rotary, learned]."""
    from roformer.config import load_config
    from roformer.trainer import train

    root = tmp_path_factory.mktemp("pretrained")
    overrides = [
        "data.corpus=files",
        f"data.train_files={SHARED_DATA / 'text' / 'tiny_shakespeare.txt'}",
        "data.max_documents=1500",
        "data.tokenizer_vocab_size=1000",
        "data.max_seq_length=32",
        "model.max_position_embeddings=32",
        "model.hidden_size=32",
        "model.num_layers=1",
        "model.num_heads=2",
        "model.intermediate_size=64",
        "train.max_steps=3",
        "train.eval_every=2",
        "train.per_device_batch_size=8",
        "train.log_every=1",
        "train.log_with=none",
    ]
    for scheme in ("rotary", "learned"):
        recipe = ROOT / "configs" / "pretrain" / "tiny.yaml"
        train(load_config(recipe, [*overrides, f"model.position={scheme}", f"output_dir={root / scheme}"]))
    return [root / "rotary", root / "learned"]
