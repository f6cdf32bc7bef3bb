"""The tiny pretraining run that several test files train: the real tiny recipe on 60 WikiText-2 documents,
with a 2-layer, width-32 model. Each file adds its own evaluation and checkpoint settings."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RECIPE = ROOT / "configs" / "pretrain" / "tiny.yaml"
TINY_PRETRAIN = [
    "data.corpus=files",
    f"data.train_files={DATA / 'text' / 'wikitext2.valid.txt'}",
    "data.max_documents=60",
    "data.tokenizer_vocab_size=2000",
    "data.max_seq_length=64",
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.intermediate_size=64",
    "model.max_position_embeddings=64",
    "train.per_device_batch_size=8",
    "train.log_every=1",
    "train.log_with=none",
    "train.warmup_steps=2",
]
