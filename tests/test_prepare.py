"""`roformer prepare`: repeatable tokenizers, resumable and atomic preparation, and the refusals of data that
does not fit the run."""

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import pytest

from roformer.cli import main
from roformer.config import MLMDataConfig, load_config
from roformer.errors import DataError
from roformer.prepare import Encoder
from roformer.prepared import PreparedDataset
from roformer.tasks.mlm import prepare_corpus

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RECIPE = ROOT / "configs" / "pretrain" / "tiny.yaml"
SMALL = ["data.tokenizer_vocab_size=1500", "data.max_seq_length=64", "model.max_position_embeddings=64"]


def test_wordpiece_training_gives_the_same_vocabulary_in_every_process(tmp_path):
    """`tokenizers` numbers continuation symbols in hash-map order per process; ours fixes them (tokenization.py)."""
    script = (
        "import sys; from roformer.tokenization import train_wordpiece; "
        "lines = open(sys.argv[1]).read().splitlines()[:1500]; "
        "train_wordpiece(lines, 1200, 64).save_pretrained(sys.argv[2])"
    )
    for name in ("a", "b", "c"):
        subprocess.run([sys.executable, "-c", script, str(DATA / "text" / "wikitext2.valid.txt"), str(tmp_path / name)],
                       check=True, cwd=ROOT)  # fmt: skip
    first = (tmp_path / "a" / "tokenizer.json").read_bytes()
    assert all((tmp_path / n / "tokenizer.json").read_bytes() == first for n in ("b", "c"))


def _data(**extra) -> MLMDataConfig:
    return load_config(RECIPE, [*SMALL, *(f"data.{k}={v}" for k, v in extra.items())]).data


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("num_proc", [1, 2])
def test_an_interrupted_preparation_resumes_and_ends_identical(tmp_path, monkeypatch, num_proc):
    import roformer.tasks.mlm as mlm

    monkeypatch.setattr(mlm, "CHUNK_CHARS", 50_000)  # many chunks, and progress recorded every 2 of them
    monkeypatch.setattr(mlm, "PROGRESS_EVERY", 2)
    straight = prepare_corpus(_data(), tmp_path / "straight", num_proc=num_proc, shard_tokens=100_000)
    assert len(straight.manifest["splits"]["train"]["tokens"]) > 2  # several shards

    real_map, seen = Encoder.map, {"chunks": 0}

    def interrupted_map(self, chunked):
        for item in real_map(self, chunked):
            seen["chunks"] += 1
            if seen["chunks"] == 11:  # past five recorded progress points, in the middle of a shard
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(Encoder, "map", interrupted_map)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(_data(), tmp_path / "resumed", num_proc=num_proc, shard_tokens=100_000)
    assert not (tmp_path / "resumed").exists()  # never taken for a finished dataset
    with pytest.raises(DataError, match="unfinished preparation is in .*resumed.partial"):
        PreparedDataset(tmp_path / "resumed")
    monkeypatch.setattr(Encoder, "map", real_map)
    resumed = prepare_corpus(_data(), tmp_path / "resumed", num_proc=num_proc, shard_tokens=100_000)

    ours, reference = _files(resumed.path), _files(straight.path)
    manifest = (json.loads(ours.pop("manifest.json")), json.loads(reference.pop("manifest.json")))
    for m in manifest:
        m.pop("prepare_seconds")
    assert manifest[0] == manifest[1]
    assert ours == reference  # every shard, length file and the tokenizer, byte for byte


def test_a_finished_dataset_is_reused_and_never_overwritten(tmp_path, capsys):
    out = tmp_path / "prepared"
    args = ["prepare", "--config", str(RECIPE), "--out", str(out), "--num_proc", "1", *SMALL]
    assert main(args) == 0
    before = _files(out)
    assert main(args) == 0  # same settings: kept as it is
    assert _files(out) == before
    assert main([*args, "data.max_seq_length=128", "model.max_position_embeddings=128"]) == 2
    assert "already holds a prepared dataset with other settings" in capsys.readouterr().err
    assert _files(out) == before


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "prepared"
    assert main(["prepare", "--config", str(RECIPE), "--out", str(out), "--num_proc", "1", *SMALL]) == 0
    return out


def _pretrain(tmp_path, *extra):
    run = tmp_path / "run"
    args = ["pretrain", "--config", str(RECIPE), *SMALL, f"output_dir={run}", "train.max_steps=2",
            "train.log_with=none", "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
            "model.intermediate_size=64", *extra]  # fmt: skip
    return main(args), run


def test_training_reads_the_prepared_dataset_and_its_vocabulary(tmp_path, prepared):
    code, run = _pretrain(tmp_path, f"data.prepared={prepared}")
    assert code == 0
    assert filecmp.cmp(run / "tokenizer" / "tokenizer.json", prepared / "tokenizer" / "tokenizer.json", shallow=False)


@pytest.mark.parametrize(
    "change, expected",
    [
        (["data.max_seq_length=32", "model.max_position_embeddings=32"], "prepared for blocks of 64 tokens"),
        ("tokenizer", "its token ids come from another tokenizer"),
        ("truncate", "has 10 bytes, the manifest says"),
        ("remove", "is missing; prepare the dataset again"),
        ("not-prepared", "not a prepared dataset, no manifest.json"),
    ],
)
def test_data_that_does_not_fit_the_run_is_refused_in_one_line(tmp_path, prepared, capsys, change, expected):
    target = tmp_path / "copy"
    import shutil

    shutil.copytree(prepared, target)
    extra = []
    if change == "tokenizer":
        from roformer.tokenization import train_wordpiece

        other = train_wordpiece(["other words entirely"] * 50 + ["more text here"] * 50, 200, 64)
        other.save_pretrained(tmp_path / "t")
        extra = [f"data.tokenizer={tmp_path / 't'}"]
    elif change == "truncate":
        shard = next((target / "train").glob("tokens-*.bin"))
        shard.write_bytes(shard.read_bytes()[:10])
    elif change == "remove":
        next((target / "train").glob("tokens-*.bin")).unlink()
    elif change == "not-prepared":
        (target / "manifest.json").unlink()
    else:
        extra = change
    code, run = _pretrain(tmp_path, f"data.prepared={target}", *extra)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert not run.exists()


def test_continued_pretraining_reads_the_text_with_the_checkpoints_vocabulary(tmp_path, prepared):
    """init_from a run whose vocabulary differs from the recipe's: the corpus is prepared with the checkpoint's
    tokenizer, and the run records the checkpoint's tokenizer."""
    code, first = _pretrain(tmp_path / "a", f"data.prepared={prepared}")
    assert code == 0
    code, second = _pretrain(tmp_path / "b", f"init_from={first / 'final'}", "data.tokenizer_vocab_size=900")
    assert code == 0
    assert filecmp.cmp(second / "tokenizer" / "tokenizer.json", first / "final" / "tokenizer.json", shallow=False)
    assert load_config(second / "config.yaml").data.tokenizer == str(first / "final")


def test_a_long_document_is_tokenized_in_pieces_to_the_same_ids(monkeypatch):
    """A 50 MB single line took 8 GB in one tokenizer call (0.65 GB in pieces, measured in docs/results.md)."""
    import numpy as np

    import roformer.prepare as prepare
    from roformer.tokenization import train_wordpiece

    text = " ".join((DATA / "text" / "wikitext2.valid.txt").read_text().split()[:20_000])
    tokenizer = train_wordpiece([text], 800, 64).backend_tokenizer
    monkeypatch.setattr(prepare, "PIECE_CHARS", 5_000)
    monkeypatch.setattr(prepare, "CHUNK_CHARS", 20_000)
    assert len(prepare.pieces(text, 5_000)) > 20 and "".join(prepare.pieces(text, 5_000)) == text
    ids, lengths = prepare.encode_texts(tokenizer, [text, "a short one"], 3, np.dtype("<u2"))
    assert ids[: lengths[0] - 1].tolist() == tokenizer.encode(text, add_special_tokens=False).ids
    assert ids[lengths[0] - 1] == 3 and len(ids) == lengths.sum()
