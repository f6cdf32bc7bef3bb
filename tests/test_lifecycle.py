"""One task lifecycle (issue 12, item 5): init_from decides the architecture and the tokenizer, model overrides
apply where they can and are refused where they cannot; the same for MLM, GLUE and translation."""

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from roformer.cli import main
from roformer.config import load_config
from roformer.errors import ConfigError, DataError
from roformer.tasks.mlm import MLMTask
from roformer.tokenization import load_tokenizer, train_wordpiece
from roformer.trainer import train

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RECIPE = ROOT / "configs" / "pretrain" / "tiny.yaml"  # hidden 256, 4 layers: not the checkpoint's sizes
DATA_ONLY = [
    "data.corpus=files",
    f"data.train_files={DATA / 'text' / 'wikitext2.valid.txt'}",
    "data.max_documents=60",
    "data.max_seq_length=32",
    "train.per_device_batch_size=8",
    "train.log_with=none",
    "train.eval_every=100",
    "train.max_eval_batches=2",
]


def continued(run_dir, init_from, *extra):
    return load_config(RECIPE, [*DATA_ONLY, f"init_from={init_from}", f"output_dir={run_dir}", *extra])


def test_continued_pretraining_uses_the_checkpoints_tokenizer_and_records_its_architecture(
    tiny_pretrained_runs, tmp_path
):
    """Issue 12 (a): a new WordPiece vocabulary was trained, so the pretrained embeddings were read under other
    token ids; (b): config.yaml said hidden 256 / 4 layers for a 32 / 1 model and hidden_dropout=0.3 was ignored."""
    final = tiny_pretrained_runs[0] / "final"
    run = tmp_path / "run"
    cfg = continued(run, final, "train.max_steps=1", "train.save_every=100", "model.hidden_dropout=0.3")
    task = MLMTask(cfg)
    task.setup(Accelerator(cpu=True), run)
    assert task.tokenizer.get_vocab() == load_tokenizer(final).get_vocab()
    model = task.build_model()
    reference = type(model).from_pretrained(final)
    assert (cfg.model.hidden_size, cfg.model.num_layers) == (32, 1) and cfg.model.hidden_dropout == 0.3
    for name, weight in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], weight, msg=name)
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} <= {0.3, cfg.model.attention_dropout}

    train(continued(run, final, "train.max_steps=1", "train.save_every=100", "model.hidden_dropout=0.3"))
    recorded = load_config(run / "config.yaml").model
    assert (recorded.hidden_size, recorded.num_layers, recorded.hidden_dropout) == (32, 1, 0.3)
    assert recorded.vocab_size == reference.config.vocab_size
    assert load_tokenizer(run / "tokenizer").get_vocab() == load_tokenizer(final).get_vocab()


@pytest.mark.parametrize(
    "override, key",
    [("model.hidden_size=64", "model.hidden_size=64"), ("model.position=sinusoidal", "model.position='sinusoidal'")],
)
def test_a_model_override_that_cannot_apply_to_the_checkpoint_is_refused(
    tiny_pretrained_runs, tmp_path, capsys, override, key
):
    final = tiny_pretrained_runs[0] / "final"
    args = ["pretrain", "--config", str(RECIPE), *DATA_ONLY, f"init_from={final}", f"output_dir={tmp_path / 'r'}"]
    assert main([*args, override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and key in err and "cannot apply with init_from" in err
    assert not (tmp_path / "r").exists()


def test_a_tokenizer_bigger_than_the_checkpoints_embedding_is_refused(tiny_pretrained_runs, tmp_path):
    final = tiny_pretrained_runs[0] / "final"
    big = train_wordpiece((DATA / "text" / "wikitext2.valid.txt").read_text().splitlines()[:3000], 3000, 32)
    big.save_pretrained(tmp_path / "big")
    cfg = continued(tmp_path / "run", final, f"data.tokenizer={tmp_path / 'big'}")
    with pytest.raises(DataError, match=r"the tokenizer has \d+ tokens but init_from=.* embeds 1000"):
        MLMTask(cfg).setup(Accelerator(cpu=True), tmp_path / "run")


def test_a_learned_checkpoint_too_short_for_the_data_is_refused(tiny_pretrained_runs, tmp_path):
    learned = tiny_pretrained_runs[1] / "final"  # a 32-row table
    cfg = continued(tmp_path / "run", learned, "data.max_seq_length=64")
    with pytest.raises(ConfigError, match="data.max_seq_length=64 is longer than model.position=.learned. allows"):
        MLMTask(cfg).setup(Accelerator(cpu=True), tmp_path / "run")


def test_init_from_must_hold_the_tasks_model(tiny_pretrained_runs, tmp_path):
    from roformer.tasks.translation import TranslationTask

    cfg = load_config(
        ROOT / "configs" / "wmt14" / "multi30k_small.yaml",
        [f"init_from={tiny_pretrained_runs[0] / 'final'}", f"output_dir={tmp_path / 'run'}"],
    )
    with pytest.raises(DataError, match="holds a RoFormerForMaskedLM, not a RoFormerForSeq2SeqLM"):
        TranslationTask(cfg).load_init_from()
