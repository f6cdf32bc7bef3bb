"""Translation data prepared once: joint BPE repeatable across processes, the prepared streams equal direct
tokenization, an interrupted preparation resumes to the same bytes, training reads the prepared pairs (never the
raw training text), and bad inputs are one-line errors that leave nothing half-written."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator

import roformer.tasks.translation as translation
from roformer.cli import main
from roformer.config import MLMDataConfig, TranslationDataConfig, load_config
from roformer.errors import DataError
from roformer.prepared import PreparedDataset
from roformer.tasks.translation import prepare_parallel, prepared_parallel, train_joint_bpe
from roformer.tokenization import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MULTI30K = DATA / "multi30k"
RECIPE = ROOT / "configs" / "wmt14" / "multi30k_small.yaml"
PAIRS = 600
pytestmark = pytest.mark.skipif(not (MULTI30K / "train.en").is_file(), reason="../shared/data/multi30k missing")


def file_lines(name: str, n: int | None = None) -> list[str]:
    """Lines split at \\n only, as a parallel corpus is aligned."""
    lines = (MULTI30K / name).read_bytes().decode("utf-8").split("\n")
    return (lines[:-1] if lines[-1] == "" else lines)[:n]


def config(**data) -> TranslationDataConfig:
    return TranslationDataConfig(
        **{"train_prefix": str(MULTI30K / "train"), "max_train_samples": PAIRS, "bpe_vocab_size": 500, **data}
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> PreparedDataset:
    """600 Multi30k pairs in chunks of ~3000 characters and shards of ~4000 tokens (several per stream)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(translation, "CHUNK_CHARS", 3000)
        return prepare_parallel(config(), tmp_path_factory.mktemp("mt") / "prepared", num_proc=1, shard_tokens=4000)


@pytest.fixture(autouse=True)
def _one_thread():
    """Two OpenMP threads on two shared cores slow these small ops down by 10x or more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def exits_2(argv: list[str], capsys) -> str:
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, err[-2000:]
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def tree(path: Path) -> dict[str, bytes]:
    """Every file's bytes under `path` (the manifest without its timing)."""
    files = {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    manifest = json.loads(files.pop("manifest.json"))
    del manifest["prepare_seconds"]
    return {**files, "manifest.json": json.dumps(manifest, sort_keys=True).encode()}


# --------------------------------------------------------------------------------------------------
# The tokenizer and the prepared streams
# --------------------------------------------------------------------------------------------------


def test_joint_bpe_gives_the_same_tokenizer_json_in_two_processes(tmp_path):
    """Two interpreters (different hash seeds) learn the BPE from the same text: identical tokenizer.json bytes."""
    script = (
        "import sys; from pathlib import Path; from roformer.tasks.translation import train_joint_bpe\n"
        "d = Path(sys.argv[1]) / 'multi30k'\n"
        "lines = (d / 'train.en').read_text().splitlines()[:3000] + (d / 'train.de').read_text().splitlines()[:3000]\n"
        "train_joint_bpe(iter(lines), 1500).save_pretrained(sys.argv[2])\n"
    )
    for run, seed in (("a", "1"), ("b", "2")):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        done = subprocess.run([sys.executable, "-c", script, str(DATA), str(tmp_path / run)], env=env, timeout=300)
        assert done.returncode == 0
    first, second = (tmp_path / "a" / "tokenizer.json").read_bytes(), (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert len(json.loads(first)["model"]["vocab"]) == 1500
    assert first == second


def test_prepared_streams_are_the_files_tokenized_with_eos(prepared):
    tok = load_tokenizer(prepared.tokenizer_dir)
    assert prepared.kind == "translation" and prepared.manifest["languages"] == ["en", "de"]
    for name, lang in (("source", "en"), ("target", "de")):
        stream = prepared.stream("train", name)
        assert len(stream.shards) > 1  # items cross no shard boundary, the stream reads across them
        encoded = tok(file_lines(f"train.{lang}", PAIRS), add_special_tokens=False)["input_ids"]
        expected = [ids + [tok.eos_token_id] for ids in encoded]
        assert stream.lengths().tolist() == [len(ids) for ids in expected]
        assert stream.tokens(0, len(stream)).tolist() == [i for ids in expected for i in ids]
        assert stream.item(417).tolist() == expected[417]
    counts = prepared.manifest["counts"]["train"]
    assert counts["pairs"] == PAIRS and counts["tokens"] == counts["source_tokens"] + counts["target_tokens"]
    assert prepared.manifest["dtype"] == "<u2" and prepared.manifest["vocab_size"] == 500


def test_an_interrupted_preparation_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    """Killed after 7 chunks (progress recorded after 3 and 6: chunk 7 written past it), then run again: the
    result equals, byte for byte, an uninterrupted preparation (made with two processes)."""
    monkeypatch.setattr(translation, "CHUNK_CHARS", 3000)
    monkeypatch.setattr(translation, "PROGRESS_EVERY", 3)
    straight = prepare_parallel(config(), tmp_path / "straight", num_proc=2, shard_tokens=4000)

    plain_map = translation.Encoder.map

    def killed_after_7(self, chunked):
        for number, done in enumerate(plain_map(self, chunked), start=1):
            if number > 7:
                raise KeyboardInterrupt
            yield done

    monkeypatch.setattr(translation.Encoder, "map", killed_after_7)
    with pytest.raises(KeyboardInterrupt):
        prepare_parallel(config(), tmp_path / "resumed", num_proc=1, shard_tokens=4000)
    partial = tmp_path / "resumed.partial"
    assert not (tmp_path / "resumed").exists() and partial.is_dir()
    progress = json.loads((partial / "progress.json").read_text())
    recorded = sum(s["tokens"] for s in progress["splits"]["train"]["source"])
    assert sum(p.stat().st_size for p in partial.glob("train/source-*.bin")) > 2 * recorded  # unrecorded tail
    with pytest.raises(DataError, match="an unfinished preparation is in"):
        PreparedDataset(tmp_path / "resumed")

    monkeypatch.setattr(translation.Encoder, "map", plain_map)
    resumed = prepare_parallel(config(), tmp_path / "resumed", num_proc=1, shard_tokens=4000)
    assert not partial.exists()
    assert tree(resumed.path) == tree(straight.path)
    assert len(straight.manifest["splits"]["train"]["source"]) > 2


def test_a_hub_split_with_a_translation_column_gives_one_pair_per_row(tmp_path):
    """wmt14's layout (a `translation` struct of {lang: text}) read through datasets' streaming loader from a local
    directory, as the hub serves it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    en, de = file_lines("train.en", 80), file_lines("train.de", 80)
    hub = tmp_path / "wmt"
    hub.mkdir()
    pq.write_table(pa.table({"translation": [{"de": d, "en": e} for e, d in zip(en, de)]}), hub / "train-0.parquet")
    dataset = prepare_parallel(
        TranslationDataConfig(hub_name=str(hub), hub_config=None, bpe_vocab_size=300), tmp_path / "p", num_proc=1
    )
    tok = load_tokenizer(dataset.tokenizer_dir)
    source = dataset.stream("train", "source")
    assert source.lengths().tolist() == [len(tok(e, add_special_tokens=False)["input_ids"]) + 1 for e in en]
    assert dataset.stream("train", "target").item(79).tolist() == tok(de[79], add_special_tokens=False)["input_ids"] + [
        2
    ]
    with pytest.raises(DataError, match="a row has no 'fr' and 'de' translation"):
        prepare_parallel(
            TranslationDataConfig(hub_name=str(hub), hub_config=None, source_lang="fr"), tmp_path / "q", num_proc=1
        )
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


# --------------------------------------------------------------------------------------------------
# Training from the prepared pairs
# --------------------------------------------------------------------------------------------------

TINY = [
    "data.max_eval_samples=16",
    "data.max_tokens=400",
    "data.beam_size=1",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_layers=1",
    "model.num_decoder_layers=1",
    "train.max_steps=3",
    "train.eval_every=100",
    "train.save_every=100",
    "train.average_checkpoints=1",
    "train.log_every=1",
]


def test_prepare_once_then_train_from_it_without_the_raw_training_text(tmp_path, capsys):
    """`roformer prepare`, then `roformer translate data.prepared=...` with the training files gone: the run reads
    only the prepared pairs (the first data.max_train_samples of them), and keeps the prepared tokenizer."""
    prepared = tmp_path / "prepared"
    argv = ["prepare", "--config", str(RECIPE), "--out", str(prepared), "--num_proc", "1"]
    assert main([*argv, f"data.max_train_samples={PAIRS}", "data.bpe_vocab_size=500"]) == 0
    assert f"train with data.prepared={prepared}" in capsys.readouterr().out
    run = tmp_path / "run"
    overrides = [f"data.prepared={prepared}", f"data.train_prefix={tmp_path / 'gone'}", "data.max_train_samples=300"]
    assert main(["translate", "--config", str(RECIPE), *overrides, *TINY, f"output_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert f"of 300 kept by the length filters ({prepared})" in out
    assert (run / "tokenizer" / "tokenizer.json").read_bytes() == (
        prepared / "tokenizer" / "tokenizer.json"
    ).read_bytes()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "train/loss" in m] == [1, 2, 3]
    assert "eval/bleu" in json.loads((run / "eval_results.json").read_text())


def test_a_resumed_run_from_prepared_pairs_matches_the_straight_run_without_replaying_data(
    prepared, tmp_path, monkeypatch
):
    """Interrupted after step 3 of 6 and resumed: the same losses, bit for bit, and the resumed run collates only
    its own 3 training batches (the position is sought, not replayed)."""
    from roformer.trainer import Trainer, train

    def run(run_dir: Path, *extra: str):
        overrides = [f"data.prepared={prepared.path}", *TINY, "train.max_steps=6", f"output_dir={run_dir}", *extra]
        return train(load_config(RECIPE, overrides))

    def losses(run_dir: Path) -> list:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]

    run(tmp_path / "straight")
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_stop_requested", lambda self, stop: self.state.step == 3)
        assert run(tmp_path / "resumed") == {"status": "interrupted", "step": 3}
    collated = []
    plain_call = translation.PairCollator.__call__

    def counting(self, indices):
        if isinstance(self.source, translation.TokenStream):  # training batches, not dev/test
            collated.append(list(indices))
        return plain_call(self, indices)

    monkeypatch.setattr(translation.PairCollator, "__call__", counting)
    run(tmp_path / "resumed", "train.resume_from=latest")
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert len(losses(tmp_path / "straight")) == 6 and len(collated) == 3


def test_a_recipe_with_raw_sources_prepares_into_the_cache_once(tmp_path):
    cfg = load_config(RECIPE, [f"data.max_train_samples={PAIRS}", "data.bpe_vocab_size=500",
                               f"data.prepared_cache={tmp_path}"])  # fmt: skip
    accelerator = Accelerator(cpu=True)
    dataset = prepared_parallel(cfg, accelerator)
    assert dataset.path.parent == tmp_path and dataset.path.name == f"translation-{dataset.fingerprint}"
    stamp = (dataset.path / "manifest.json").stat().st_mtime_ns
    assert prepared_parallel(cfg, accelerator).path == dataset.path
    assert (dataset.path / "manifest.json").stat().st_mtime_ns == stamp  # found, not prepared again
    other = load_config(RECIPE, [f"data.max_train_samples={PAIRS // 2}", "data.bpe_vocab_size=500",
                                 f"data.prepared_cache={tmp_path}"])  # fmt: skip
    assert prepared_parallel(other, accelerator).path != dataset.path  # other settings, another dataset


def test_token_batches_of_millions_of_pairs_equal_the_greedy_loop():
    """The windowed numpy cut is the greedy loop's cut, pair for pair (also with pairs longer than the budget)."""
    rng = np.random.default_rng(1)
    sizes = np.concatenate([rng.integers(1, 120, 20_000), [700, 900]])
    order = rng.permutation(len(sizes))
    expected, start, longest = [], 0, 0
    for pos, i in enumerate(order):
        grown = max(longest, int(sizes[i]))
        if pos > start and grown * (pos - start + 1) > 512:
            expected.append(order[start:pos].tolist())
            start, grown = pos, int(sizes[i])
        longest = grown
    expected.append(order[start:].tolist())
    assert [b.tolist() for b in translation.token_batches(order, sizes, 512)] == expected
    assert translation.token_batches(np.zeros(0, dtype=np.int64), sizes, 512) == []


# --------------------------------------------------------------------------------------------------
# Bad inputs: exit 2, one line, nothing half-written
# --------------------------------------------------------------------------------------------------


def test_parallel_files_of_different_lengths_are_refused_before_anything_is_written(tmp_path, capsys):
    (tmp_path / "c.en").write_text("one\ntwo\nthree\n")
    (tmp_path / "c.de").write_text("eins\nzwei")
    out = tmp_path / "out"
    argv = ["prepare", "--config", str(RECIPE), "--out", str(out), f"data.train_prefix={tmp_path / 'c'}"]
    err = exits_2(argv, capsys)
    assert f"{tmp_path / 'c.en'} has 3 lines but {tmp_path / 'c.de'} has 2" in err
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    (tmp_path / "c.de").write_text("")
    assert "c.de: file is empty" in exits_2(argv, capsys)
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_a_prepared_dataset_that_does_not_fit_the_run_is_refused(prepared, tmp_path, capsys):
    run = ["translate", "--config", str(RECIPE), *TINY, f"output_dir={tmp_path / 'run'}"]
    other = train_joint_bpe(file_lines("val.en") + file_lines("val.de"), vocab_size=300)
    other.save_pretrained(tmp_path / "other")
    err = exits_2([*run, f"data.prepared={prepared.path}", f"data.tokenizer={tmp_path / 'other'}"], capsys)
    assert f"data.prepared={prepared.path}: its token ids come from another tokenizer than data.tokenizer=" in err
    err = exits_2([*run, f"data.prepared={prepared.path}", "data.source_lang=de", "data.target_lang=en"], capsys)
    assert "prepared for en-de, but data.source_lang=de" in err

    from roformer.tasks.mlm import prepare_corpus

    mlm = prepare_corpus(
        MLMDataConfig(
            corpus="files",
            train_files=[str(DATA / "text" / "tiny_shakespeare.txt")],
            max_documents=300,
            tokenizer_vocab_size=300,
            max_seq_length=32,
        ),  # fmt: skip
        tmp_path / "mlm",
        num_proc=1,
    )
    capsys.readouterr()
    assert "holds mlm data, not translation pairs" in exits_2([*run, f"data.prepared={mlm.path}"], capsys)

    broken = tmp_path / "broken"
    shutil.copytree(prepared.path, broken)
    target = broken / "train" / "target-00001.bin"
    os.truncate(target, target.stat().st_size - 2)
    assert f"shard {target} has" in exits_2([*run, f"data.prepared={broken}"], capsys)
    (broken / "train" / "source-00000.len").unlink()
    assert "source-00000.len is missing" in exits_2([*run, f"data.prepared={broken}"], capsys)
    assert not (tmp_path / "run").exists()
