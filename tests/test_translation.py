"""Translation: data, batching, schedule, checkpoint averaging, BLEU scripts, errors, and a short real run."""

import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
import torch
from accelerate import Accelerator
from safetensors.torch import save_model
from torch.testing import assert_close

from roformer import ModelConfig, RoFormerForSeq2SeqLM
from roformer.bleu import translate_lines
from roformer.checkpointing import average_checkpoints
from roformer.cli import main
from roformer.config import TrainConfig, TranslationDataConfig, load_config
from roformer.errors import DataError
from roformer.modeling import load_pretrained
from roformer.tasks.translation import (
    PairCollator,
    TokenArrays,
    TranslationTask,
    hub_split,
    keep_pairs,
    token_batches,
    train_joint_bpe,
    training_pairs,
)
from roformer.trainer import build_scheduler

ROOT = Path(__file__).resolve().parents[1]
MULTI30K = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"
RECIPE = ROOT / "configs" / "wmt14" / "multi30k_small.yaml"
needs_multi30k = pytest.mark.skipif(not (MULTI30K / "train.en").is_file(), reason="../shared/data/multi30k missing")


@pytest.fixture(autouse=True)
def _one_thread():
    """Two OpenMP threads on two shared cores slow these small ops down by 10x or more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lines(name: str, n: int) -> list[str]:
    return (MULTI30K / name).read_text(encoding="utf-8").splitlines()[:n]


def tiny_seq2seq(vocab_size: int = 50, seed: int = 0) -> RoFormerForSeq2SeqLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=4,
        intermediate_size=64,
        scale_embeddings=True,
        embedding_layer_norm=False,
        type_vocab_size=0,
    )
    return RoFormerForSeq2SeqLM(cfg).eval()


# --------------------------------------------------------------------------------------------------
# Optimizer schedule and model init
# --------------------------------------------------------------------------------------------------


def test_inverse_sqrt_schedule_is_fairseqs():
    """transformers' inverse_sqrt (timescale defaults to the warmup) + the trainer's warmup floor equal fairseq's
    inverse_sqrt: linear from warmup_init_lr to lr over the warmup, then lr * sqrt(warmup / step)."""
    tc = TrainConfig(
        learning_rate=5e-4, lr_scheduler="inverse_sqrt", warmup_steps=4000, warmup_init_lr=1e-7, max_steps=100_000
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=tc.learning_rate)
    factor = build_scheduler(optimizer, tc).lr_lambdas[0]

    def fairseq(step: int) -> float:
        if step < 4000:
            return 1e-7 + step * (5e-4 - 1e-7) / 4000
        return 5e-4 * math.sqrt(4000) / math.sqrt(step)

    for step in (0, 1, 1000, 3999, 4000, 4001, 16000, 100_000):
        assert math.isclose(tc.learning_rate * factor(step), fairseq(step), rel_tol=1e-9), step
    assert math.isclose(tc.learning_rate * factor(16000), 2.5e-4, rel_tol=1e-9)  # halves when steps quadruple


def test_a_fresh_translation_model_starts_near_the_uniform_loss():
    """Guards the init: with tied, sqrt(d)-scaled embeddings an init that lets the residual stream carry the input
    embedding to the output layer makes the model copy its input token (initial loss 15 instead of ln V = 9)."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=8000,
        hidden_size=256,
        num_heads=4,
        num_layers=3,
        num_decoder_layers=3,
        intermediate_size=1024,
        hidden_act="relu",
        scale_embeddings=True,
        embedding_layer_norm=False,
        type_vocab_size=0,
        layer_norm_eps=1e-5,
    )
    model = RoFormerForSeq2SeqLM(cfg).eval()
    source, target = torch.randint(4, 8000, (8, 20)), torch.randint(4, 8000, (8, 21))
    with torch.no_grad():
        loss = model(source, decoder_input_ids=target[:, :-1], labels=target[:, 1:]).loss.item()
    assert abs(loss - math.log(8000)) < 1.0


# --------------------------------------------------------------------------------------------------
# Data: BPE, filters, batches
# --------------------------------------------------------------------------------------------------


@needs_multi30k
def test_joint_bpe_round_trips_raw_text_of_both_languages():
    """Detokenized BLEU needs decode(encode(line)) == line."""
    english, german = lines("train.en", 300), lines("train.de", 300)
    tok = train_joint_bpe(english + german, vocab_size=800)
    assert [tok.convert_ids_to_tokens(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    held_out = lines("val.en", 50) + lines("val.de", 50)
    ids = tok(held_out, add_special_tokens=False)["input_ids"]
    decoded = tok.batch_decode(ids, skip_special_tokens=True)
    unknown = [line for line, row in zip(held_out, ids) if tok.unk_token_id in row]
    assert [d for d, line in zip(decoded, held_out) if line not in unknown] == [
        line for line in held_out if line not in unknown
    ]
    assert len(unknown) < 5  # characters never seen in 300 training pairs


def test_length_filters_follow_clean_corpus():
    data = TranslationDataConfig(max_source_length=10, max_target_length=10, max_length_ratio=1.5)
    # lengths include EOS: (src, tgt) tokens -> kept?
    pairs = {(5, 5): True, (1, 4): False, (4, 1): False, (11, 5): False, (5, 11): False, (5, 7): True, (5, 8): False}
    src, tgt = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    kept = set(keep_pairs(src, tgt, data).tolist())
    assert [i in kept for i in range(len(pairs))] == list(pairs.values())


def test_token_batches_fit_max_tokens_and_cover_every_pair_once():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 60, size=500)
    order = np.argsort(sizes, kind="stable")
    batches = token_batches(order, sizes, max_tokens=256)
    assert np.array_equal(np.concatenate(batches), order)
    for batch in batches:
        assert len(batch) * sizes[batch].max() <= 256
    # greedy: adding the next pair would have overflowed
    for batch, following in zip(batches, batches[1:]):
        grown = np.append(batch, following[0])
        assert len(grown) * sizes[grown].max() > 256
    assert token_batches(np.array([0]), np.array([999]), max_tokens=256)[0].tolist() == [0]  # too long: alone


def test_collator_shifts_targets_behind_bos():
    source = TokenArrays(np.array([5, 6, 2, 7, 2], dtype=np.int32), np.array([0, 3, 5]))
    target = TokenArrays(np.array([8, 9, 10, 2, 11, 2], dtype=np.int32), np.array([0, 4, 6]))
    batch = PairCollator(source, target, pad_id=0, bos_id=1)([0, 1])
    assert batch["input_ids"].tolist() == [[5, 6, 2], [7, 2, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["decoder_input_ids"].tolist() == [[1, 8, 9, 10], [1, 11, 0, 0]]
    assert batch["labels"].tolist() == [[8, 9, 10, 2], [11, 2, -100, -100]]
    assert batch["example_index"].tolist() == [0, 1]


def test_a_resumed_run_reuses_its_tokenizer(tmp_path):
    saved = train_joint_bpe(["ein kleiner Hund", "a small dog"] * 20, vocab_size=60)
    saved.save_pretrained(tmp_path / "tokenizer")
    cfg = load_config(RECIPE, ["train.resume_from=latest", "data.bpe_vocab_size=500"])
    task = TranslationTask(cfg)
    reused = task.resolve_tokenizer(accelerator=None, run_dir=tmp_path, train=lambda: pytest.fail("trained anew"))
    assert reused.get_vocab() == saved.get_vocab()


def test_hub_failures_are_one_line_data_errors(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wmt14' on the Hub\n(offline)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    for read in (lambda data: hub_split(data, "validation"), lambda data: list(training_pairs(data))):
        with pytest.raises(DataError) as err:
            read(TranslationDataConfig(hub_name="wmt14"))
        assert "\n" not in str(err.value) and "data.hub_name=wmt14" in str(err.value)


# --------------------------------------------------------------------------------------------------
# Bad input files: exit status 2 and one line naming the file
# --------------------------------------------------------------------------------------------------


def _write_pair(tmp_path: Path, en: bytes, de: bytes) -> Path:
    (tmp_path / "bad.en").write_bytes(en)
    (tmp_path / "bad.de").write_bytes(de)
    return tmp_path / "bad"


BAD_INPUTS = {
    "line counts differ": (b"one\ntwo\nthree\n", b"eins\nzwei\n", "bad.en has 3 lines but"),
    "empty file": (b"one\ntwo\n", b"", "bad.de: file is empty"),
    "not UTF-8": (b"one\ntwo\n", b"eins\nzw\xe4i\n", "bad.de: line 2 is not UTF-8"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_training_files_exit_2_naming_the_file(tmp_path, capsys, case):
    en, de, expected = BAD_INPUTS[case]
    prefix = _write_pair(tmp_path, en, de)
    run_dir = tmp_path / "run"
    status = main(["translate", "--config", str(RECIPE), f"data.train_prefix={prefix}", f"output_dir={run_dir}"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err
    assert str(tmp_path) in err
    assert not run_dir.exists()  # bad input leaves no run behind
    assert not list((Path(os.environ["ROFORMER_CACHE"]) / "prepared").glob("*.partial"))  # nor half a dataset


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_bleu_files_exit_2_naming_the_file(tmp_path, capsys, case):
    en, de, expected = BAD_INPUTS[case]
    prefix = _write_pair(tmp_path, en, de)
    status = main(["evaluate-bleu", "--src", f"{prefix}.en", "--ref", f"{prefix}.de", "--hyp", f"{prefix}.en"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and expected in err


# --------------------------------------------------------------------------------------------------
# Checkpoint averaging
# --------------------------------------------------------------------------------------------------


def _fake_run(tmp_path: Path, steps=(100, 200, 300)) -> tuple[Path, list[Path], list[dict]]:
    """A run directory with final/ (model + tokenizer) and checkpoints/step_N/model.safetensors written as
    accelerate writes them (tied embeddings stored once)."""
    run = tmp_path / "run"
    tok = train_joint_bpe(["a small dog", "ein kleiner Hund"] * 10, vocab_size=50)
    final_model = tiny_seq2seq(len(tok))
    final_model.save_pretrained(run / "final")
    tok.save_pretrained(run / "final")
    paths, states = [], []
    for i, step in enumerate(steps):
        model = tiny_seq2seq(len(tok), seed=i + 1)
        path = run / "checkpoints" / f"step_{step}"
        path.mkdir(parents=True)
        save_model(model, str(path / "model.safetensors"))
        paths.append(path)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return run, paths, states


def test_averaged_checkpoints_are_the_mean_of_the_weights(tmp_path):
    _, paths, states = _fake_run(tmp_path)
    averaged = average_checkpoints(paths)
    assert averaged  # and every saved tensor is the element-wise mean
    for key, value in averaged.items():
        assert_close(value, sum(s[key] for s in states) / len(states))
    assert not torch.allclose(averaged["encoder.layers.0.ffn.up.weight"], states[0]["encoder.layers.0.ffn.up.weight"])


def test_average_checkpoints_command_writes_a_loadable_mean_model(tmp_path, capsys):
    run, paths, states = _fake_run(tmp_path)
    out = tmp_path / "averaged"
    assert main(["average-checkpoints", *map(str, paths), "--out", str(out)]) == 0
    model = RoFormerForSeq2SeqLM.from_pretrained(out)
    for key, value in model.state_dict().items():
        assert_close(value, sum(s[key] for s in states) / len(states))
    assert model.lm_head.weight is model.embeddings.word_embeddings.weight
    assert (out / "tokenizer.json").read_text() == (run / "final" / "tokenizer.json").read_text()


# --------------------------------------------------------------------------------------------------
# BLEU
# --------------------------------------------------------------------------------------------------


@needs_multi30k
def test_evaluate_bleu_scores_ready_translations_as_sacrebleu_does(tmp_path, capsys):
    refs = lines("val.de", 60)
    hyps = [" ".join(r.split()[: max(1, len(r.split()) - i % 4)]) for i, r in enumerate(refs)]  # damaged refs
    (tmp_path / "hyp.de").write_text("\n".join(hyps) + "\n", encoding="utf-8")
    scores_file = tmp_path / "scores.json"
    status = main(
        [
            "evaluate-bleu",
            "--src", str(MULTI30K / "val.en"), "--ref", str(MULTI30K / "val.de"),
            "--hyp", str(tmp_path / "hyp.de"), "--json", str(scores_file),
        ]
    )  # fmt: skip
    assert status == 2  # val.de has 1014 lines, the hypotheses 60: refused, naming the files
    (tmp_path / "src.en").write_text("\n".join(lines("val.en", 60)) + "\n", encoding="utf-8")
    (tmp_path / "ref.de").write_text("\n".join(refs) + "\n", encoding="utf-8")
    argv = ["--src", str(tmp_path / "src.en"), "--ref", str(tmp_path / "ref.de"), "--hyp", str(tmp_path / "hyp.de")]
    assert main(["evaluate-bleu", *argv, "--json", str(scores_file)]) == 0
    scores = json.loads(scores_file.read_text())
    expected = sacrebleu.corpus_bleu(hyps, [refs])
    assert 20 < scores["bleu"] < 100
    assert scores["bleu"] == pytest.approx(expected.score, abs=1e-9)
    assert scores["tok_bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs], tokenize="intl").score, abs=1e-9)
    assert scores["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    printed = capsys.readouterr().out
    assert f"sacreBLEU (detokenized) = {expected.score:.2f}" in printed and "tokenized BLEU" in printed


@needs_multi30k
def test_evaluate_bleu_script_translates_and_scores_its_output(tmp_path, monkeypatch, capsys):
    """scripts/evaluate_bleu.py with a model directory: writes one translation per source line, equal to the
    library's, and reports sacreBLEU of exactly those lines."""
    src, ref = lines("val.en", 12), lines("val.de", 12)
    (tmp_path / "src.en").write_text("\n".join(src) + "\n", encoding="utf-8")
    (tmp_path / "ref.de").write_text("\n".join(ref) + "\n", encoding="utf-8")
    tok = train_joint_bpe(lines("train.en", 200) + lines("train.de", 200), vocab_size=300)
    model = tiny_seq2seq(len(tok))
    model.save_pretrained(tmp_path / "final")
    tok.save_pretrained(tmp_path / "final")
    argv = [
        "--checkpoint",
        str(tmp_path / "final"),
        "--src",
        str(tmp_path / "src.en"),
        "--ref",
        str(tmp_path / "ref.de"),
    ]
    argv += ["--beam", "2", "--max_len_b", "8", "--batch_size", "5", "--device", "cpu"]
    argv += ["--out", str(tmp_path / "hyp.de"), "--json", str(tmp_path / "scores.json")]
    monkeypatch.setattr(sys, "argv", ["evaluate_bleu.py", *argv])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "scripts" / "evaluate_bleu.py"), run_name="__main__")
    assert exit_.value.code == 0
    hyps = (tmp_path / "hyp.de").read_text(encoding="utf-8").splitlines()
    assert len(hyps) == len(src) and any(hyps)
    assert hyps == translate_lines(model, tok, src, beam_size=2, max_len_b=8)
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [ref]).score, abs=1e-9)
    assert "sacreBLEU (detokenized)" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# A short real run
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_multi30k
def test_short_multi30k_run_lowers_the_validation_loss(tmp_path, capsys):
    """The recipe, shrunk: a tiny model on 600 Multi30k pairs for 60 steps, evaluated with greedy BLEU on the dev
    set every 10 steps, averaged over its last 2 checkpoints, then beam-4 translated dev and test sets."""
    run = tmp_path / "run"
    overrides = [
        f"output_dir={run}",
        f"data.train_prefix={MULTI30K / 'train'}",
        f"data.valid_prefix={MULTI30K / 'val'}",
        f"data.test_prefix={MULTI30K / 'test_2016_flickr'}",
        "data.max_train_samples=600",
        "data.max_eval_samples=48",
        "data.bpe_vocab_size=1000",
        "data.max_tokens=1024",
        "model.hidden_size=64",
        "model.intermediate_size=128",
        "model.num_layers=2",
        "model.num_decoder_layers=2",
        "model.hidden_dropout=0.1",
        "train.max_steps=60",
        "train.learning_rate=3e-3",
        "train.warmup_steps=10",
        "train.eval_every=10",
        "train.max_eval_batches=2",
        "train.save_every=20",
        "train.keep_last=2",
        "train.average_checkpoints=2",
        "train.log_every=10",
    ]
    assert main(["translate", "--config", str(RECIPE), *overrides]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "eval/loss" in m]
    assert [m["step"] for m in evals] == [10, 20, 30, 40, 50, 60]
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 0.5  # seen: 6.97 -> 5.97
    assert all(0.0 <= m["eval/bleu"] <= 100.0 for m in evals)
    assert [m["train/lr"] for m in metrics if "train/lr" in m][-1] == pytest.approx(3e-3 * math.sqrt(10 / 60))

    results = json.loads((run / "eval_results.json").read_text())
    assert results["eval/beam_size"] == 4 and {"eval/bleu", "test/bleu", "test/tok_bleu"} <= results.keys()
    assert results["eval/loss"] < evals[0]["eval/loss"]
    test_hyps = (run / "test_translations.de").read_text(encoding="utf-8").splitlines()
    assert len(test_hyps) == 48
    assert results["test/bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(test_hyps, [lines("test_2016_flickr.de", 48)]).score, abs=1e-9
    )
    assert (run / "final" / "tokenizer.json").read_text() == (run / "tokenizer" / "tokenizer.json").read_text()
    assert "averaged the weights of 2 checkpoints: step_40, step_60" in capsys.readouterr().out


@pytest.mark.slow
@needs_multi30k
def test_two_process_evaluation_equals_one_process_on_the_same_weights(tmp_path):
    """gloo DDP on CPU: each process decodes its share of the dev and test batches and the main process gathers
    them. The translations and scores must be those of one process decoding every batch with the same weights:
    none lost, none twice (accelerate pads the last round with repeated batches), and in the original order."""
    run = tmp_path / "two"
    overrides = [
        f"data.train_prefix={MULTI30K / 'train'}",
        f"data.valid_prefix={MULTI30K / 'val'}",
        f"data.test_prefix={MULTI30K / 'test_2016_flickr'}",
        "data.max_train_samples=300",
        "data.max_eval_samples=37",  # 7 batches of at most 200 tokens: they do not split evenly over two processes
        "data.max_tokens=200",
        "data.bpe_vocab_size=500",
        "model.hidden_size=32",
        "model.intermediate_size=64",
        "model.num_layers=1",
        "model.num_decoder_layers=1",
        "train.max_steps=4",
        "train.learning_rate=3e-3",
        "train.warmup_steps=2",
        "train.eval_every=100",
        "train.save_every=100",
        "train.average_checkpoints=1",
    ]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--main_process_port", "29534", "scripts/train_translation.py", "--config", str(RECIPE)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*launcher, *overrides, f"output_dir={run}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    two = json.loads((run / "eval_results.json").read_text())

    cfg = load_config(RECIPE, [*overrides, f"output_dir={tmp_path / 'one'}", f"data.tokenizer={run / 'final'}"])
    task, accelerator = TranslationTask(cfg), Accelerator(cpu=True)
    (tmp_path / "one").mkdir()  # the trainer makes the run directory; setup itself writes nothing there
    task.setup(accelerator, tmp_path / "one")
    model = load_pretrained(run / "final").eval()
    one = task.final_evaluation(model, task.eval_dataloader(), accelerator, tmp_path / "one")

    assert len(task.eval_dataloader()) % 2 == 1
    for name in ("valid", "test"):
        expected = (tmp_path / "one" / f"{name}_translations.de").read_text(encoding="utf-8").splitlines()
        assert (run / f"{name}_translations.de").read_text(encoding="utf-8").splitlines() == expected
        assert len(expected) == 37
    for key in ("eval/loss", "eval/nll_loss", "eval/bleu", "test/loss", "test/bleu", "test/tok_bleu"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
