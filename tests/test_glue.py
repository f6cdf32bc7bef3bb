"""GLUE: every official TSV layout (small fixtures written in it), errors a user can cause, model initialisation
from our checkpoints and from transformers BERT, short real fine-tunes on ../shared/data/glue, and the sweep."""

import json
import logging
import re
from pathlib import Path

import pytest
import torch
import transformers
from accelerate import Accelerator
from floats import assert_float32_close, network_terms

from roformer.cli import main
from roformer.config import GLUEDataConfig, ModelConfig, load_config
from roformer.errors import DataError
from roformer.glue_sweep import PAPER_TABLE2, format_report, sweep
from roformer.interop import to_transformers
from roformer.modeling import RoFormerForMaskedLM, RoFormerForSequenceClassification
from roformer.tasks.glue import GLUE_TASKS, GLUETask, load_hub, load_local, read_tsv
from roformer.tokenization import load_tokenizer, train_wordpiece
from roformer.trainer import train

REPO = Path(__file__).resolve().parents[1]
SHARED_GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
TINY_RTE = REPO / "configs" / "glue" / "tiny_rte.yaml"
TINY_MODEL = [
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.intermediate_size=128",
    "model.max_position_embeddings=64",
    "data.max_seq_length=64",
    "data.tokenizer_vocab_size=1000",
    "train.log_with=none",
    "train.log_every=5",
    "train.save_every=1000",
]
needs_shared_data = pytest.mark.skipif(not SHARED_GLUE.is_dir(), reason="../shared/data/glue is not here")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """On a few shared cores one intra-op thread is far faster than threads spinning against other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_tsv(path: Path, rows: list[list[str]], bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(("\ufeff" if bom else "") + "".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    return path


def local(task: str, data_dir: Path, layout: str = "glue"):
    return load_local(GLUEDataConfig(task_name=task, data_dir=str(data_dir), layout=layout), GLUE_TASKS[task])


def sentence(i: int) -> str:
    """Varied text with repeated words, enough for a WordPiece vocabulary."""
    return f'the {["cat", "dog", "bird"][i % 3]} "sat {i % 7} on the {["mat", "rug"][i % 2]} today'


# --------------------------------------------------------------------------------------------------
# The official layouts
# --------------------------------------------------------------------------------------------------


def test_cola_has_no_header_in_train_and_dev(tmp_path):
    for split in ("train", "dev"):
        write_tsv(tmp_path / "CoLA" / f"{split}.tsv", [["gj04", "1", "", "Fine."], ["gj04", "0", "*", "Bad it is."]])
    write_tsv(tmp_path / "CoLA" / "test.tsv", [["index", "sentence"], ["7", "Some sentence."]])
    data = local("cola", tmp_path)
    assert data.train == [{"idx": 0, "text_a": "Fine.", "labels": 1}, {"idx": 1, "text_a": "Bad it is.", "labels": 0}]
    assert [name for name, _ in data.dev] == [""]
    assert data.test == [("CoLA", [{"idx": 7, "text_a": "Some sentence."}])]


def test_mrpc_columns_byte_order_mark_and_raw_quotes(tmp_path):
    header = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    rows = [header, ["1", "11", "12", '"He said" it.', '"The pie business does not fit.'], ["0", "13", "14", "A", "B"]]
    folder = tmp_path / "MRPC"
    write_tsv(folder / "train.tsv", rows, bom=True)
    write_tsv(folder / "dev.tsv", rows, bom=True)
    write_tsv(folder / "test.tsv", [["index", *header[1:]], ["0", "1", "2", "x", "y"]])
    data = local("mrpc", folder)  # data_dir may name the task's folder itself
    # QUOTE_NONE: an unbalanced quote stays text and does not swallow the next row
    assert data.train[0] == {
        "idx": 0,
        "text_a": '"He said" it.',
        "text_b": '"The pie business does not fit.',
        "labels": 1,
    }
    assert len(data.train) == 2 and data.train[1]["labels"] == 0
    assert data.test[0][1] == [{"idx": 0, "text_a": "x", "text_b": "y"}]


STSB_HEADER = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2"]


def write_stsb(folder: Path, n: int = 24) -> None:
    rows = [[str(i), "main-captions", "MSRvid", "2012test", "0001", "none", "none", sentence(i), sentence(i + 1)]
            for i in range(n)]  # fmt: skip
    for split in ("train", "dev"):
        write_tsv(
            folder / f"{split}.tsv", [[*STSB_HEADER, "score"]] + [[*r, f"{i % 6}.000"] for i, r in enumerate(rows)]
        )
    write_tsv(folder / "test.tsv", [STSB_HEADER] + rows[:10])


def test_stsb_scores_are_floats(tmp_path):
    write_stsb(tmp_path / "STS-B")
    data = local("stsb", tmp_path)
    assert data.train[5]["labels"] == 5.0 and isinstance(data.train[5]["labels"], float)
    assert GLUE_TASKS["stsb"].num_labels == 1
    assert [ex["idx"] for ex in data.test[0][1]] == list(range(10)) and "labels" not in data.test[0][1][0]


def test_qqp_malformed_row_is_reported_with_file_and_line_and_skipped(tmp_path, caplog):
    header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    train = write_tsv(
        tmp_path / "QQP" / "train.tsv",
        [header, ["1", "1", "2", "How?", "Why?", "0"], ["2", "3", "4", "Is it?", "Which one? 0"],
         ["3", "5", "6", "A?", "B?", "1"]],
    )  # fmt: skip
    write_tsv(tmp_path / "QQP" / "dev.tsv", [header, ["9", "1", "2", "How?", "Why?", "1"]])
    table = read_tsv(train)
    assert table.malformed == [(3, 5)]  # line 3 of the file, 5 fields instead of 6
    with caplog.at_level(logging.WARNING):
        data = local("qqp", tmp_path)
    assert [ex["labels"] for ex in data.train] == [0, 1]
    assert f"{train}: skipped 1 malformed row(s)" in caplog.text and "line 3 has 5" in caplog.text
    assert data.test == [] and "test.tsv: not found" in caplog.text  # no test file: no submission, no error


MNLI_HEADER = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse"]
MNLI_HEADER += ["sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]
MNLI_LABELS = ["entailment", "neutral", "contradiction"]


def write_mnli(folder: Path, n: int = 24) -> None:
    def row(i: int) -> list[str]:
        return [str(i), "1", "1e", "fiction", "( a )", "( b )", "(ROOT a)", "(ROOT b)", sentence(i), sentence(i + 2)]

    labels = [MNLI_LABELS[i % 3] for i in range(n)]
    write_tsv(
        folder / "train.tsv", [[*MNLI_HEADER, "label1", "gold_label"]] + [[*row(i), y, y] for i, y in enumerate(labels)]
    )
    for dev in ("dev_matched.tsv", "dev_mismatched.tsv"):
        five = [f"label{k}" for k in range(1, 6)]
        write_tsv(
            folder / dev, [[*MNLI_HEADER, *five, "gold_label"]] + [[*row(i), *[y] * 5, y] for i, y in enumerate(labels)]
        )
    for test in ("test_matched.tsv", "test_mismatched.tsv"):
        write_tsv(folder / test, [MNLI_HEADER] + [row(i) for i in range(8)])


def test_mnli_official_layout_has_matched_and_mismatched(tmp_path):
    write_mnli(tmp_path / "MNLI")
    data = local("mnli", tmp_path)
    assert data.train[:3] == [
        {"idx": i, "text_a": sentence(i), "text_b": sentence(i + 2), "labels": i} for i in range(3)
    ]  # entailment, neutral, contradiction = the hub's ids
    assert [name for name, _ in data.dev] == ["", "_mm"]
    assert [name for name, _ in data.test] == ["MNLI-m", "MNLI-mm"]


def test_mnli_sample_alternate_layout(tmp_path):
    folder = tmp_path / "MNLI_sample"
    write_tsv(folder / "mnli_matched", [["neutral", "Impossible .", "Impossible , unless ."], ["entailment", "A", "B"]])
    write_tsv(folder / "mnli_mismatched", [["contradiction", "You ca n't .", "You can ."]])
    data = local("mnli", tmp_path, layout="mnli_sample")
    assert data.train == [] and data.test == []  # dev samples only
    assert data.dev[0] == ("", [{"idx": 0, "text_a": "Impossible .", "text_b": "Impossible , unless .", "labels": 1},
                                {"idx": 1, "text_a": "A", "text_b": "B", "labels": 0}])  # fmt: skip
    assert data.dev[1] == ("_mm", [{"idx": 0, "text_a": "You ca n't .", "text_b": "You can .", "labels": 2}])
    with pytest.raises(DataError, match="set data.layout=mnli_sample"):
        local("mnli", tmp_path)  # GLUE's layout expected, these are the sample files


@needs_shared_data
def test_the_real_glue_files_read_completely():
    """Row counts of ../shared/data/glue as its SOURCE.txt states them (QQP_sample: one malformed row)."""
    counts = {
        "cola": (8551, [1043], [1063]),
        "mrpc": (3668, [408], [1725]),
        "stsb": (5749, [1500], [1379]),
        "qqp": (19999, [3497], []),
        "rte": (2490, [277], [3000]),
        "wnli": (635, [71], [146]),
    }
    for task, expected in counts.items():
        data = local(task, SHARED_GLUE)
        assert (len(data.train), [len(d) for _, d in data.dev], [len(t) for _, t in data.test]) == expected
    sample = local("mnli", SHARED_GLUE, layout="mnli_sample")
    assert [len(d) for _, d in sample.dev] == [1000, 1000]


# --------------------------------------------------------------------------------------------------
# Errors a user can cause
# --------------------------------------------------------------------------------------------------

RTE_HEADER = ["index", "sentence1", "sentence2", "label"]


def write_rte(folder: Path, n: int = 8, dev: bool = True) -> None:
    rows = [[str(i), sentence(i), sentence(i + 1), ["entailment", "not_entailment"][i % 2]] for i in range(n)]
    write_tsv(folder / "train.tsv", [RTE_HEADER] + rows)
    if dev:
        write_tsv(folder / "dev.tsv", [RTE_HEADER] + rows)


def test_missing_file_is_a_data_error_naming_it(tmp_path):
    write_rte(tmp_path / "RTE", dev=False)
    with pytest.raises(DataError, match=r"RTE/dev\.tsv: file not found"):
        local("rte", tmp_path)
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match="no RTE/ folder and no dev.tsv here"):
        local("rte", tmp_path / "other")  # neither a GLUE root holding RTE/ nor the RTE folder
    with pytest.raises(DataError, match="directory not found"):
        local("rte", tmp_path / "nowhere")


def test_missing_column_and_unknown_label_name_the_file(tmp_path):
    write_rte(tmp_path / "RTE")
    write_tsv(tmp_path / "RTE" / "dev.tsv", [["index", "sentence1", "label"], ["0", "a", "entailment"]])
    with pytest.raises(DataError, match=r"dev\.tsv: no column 'sentence2' \(columns: index, sentence1, label\)"):
        local("rte", tmp_path)
    write_tsv(tmp_path / "RTE" / "dev.tsv", [RTE_HEADER, ["0", "a", "b", "entailment"], ["1", "a", "b", "maybe"]])
    with pytest.raises(DataError, match=r"dev\.tsv: line 3: label 'maybe' is not one of entailment, not_entailment"):
        local("rte", tmp_path)


def test_hub_failure_is_one_line(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as err:
        load_hub(GLUEDataConfig(task_name="rte"), GLUE_TASKS["rte"])
    assert "\n" not in str(err.value) and "data.hub_name=nyu-mll/glue" in str(err.value)


def test_cli_reports_bad_data_in_one_line_and_writes_nothing(tmp_path, capsys):
    write_rte(tmp_path / "glue" / "RTE", dev=False)
    out = tmp_path / "run"
    code = main(["finetune", "--config", str(TINY_RTE), f"data.data_dir={tmp_path / 'glue'}", f"output_dir={out}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "RTE/dev.tsv: file not found" in err[0]
    assert not out.exists()


def test_cli_rejects_an_unknown_task_name(capsys):
    assert main(["finetune", "--config", str(TINY_RTE), "data.task_name=squad"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.task_name='squad'" in err[0] and "'rte'" in err[0]


def test_recipes_follow_the_paper_protocol():
    for task, spec in GLUE_TASKS.items():
        cfg = load_config(REPO / "configs" / "glue" / f"{task}.yaml")
        assert (cfg.task, cfg.data.task_name, cfg.data.max_seq_length) == ("glue", task, 512)
        assert (cfg.train.num_epochs, cfg.train.per_device_batch_size, cfg.train.learning_rate) == (3, 32, 2e-5)
        assert cfg.train.best_metric in {f"eval/{m}" for m in spec.metrics}


# --------------------------------------------------------------------------------------------------
# Initial weights
# --------------------------------------------------------------------------------------------------


def wnli_config(tmp_path: Path, *overrides: str):
    from_checkpoint = any(o.startswith("init_from=") and o != "init_from=null" for o in overrides)
    # with init_from the checkpoint decides the sizes: a size on the command line that differs is refused
    model = [o for o in TINY_MODEL if not (from_checkpoint and o.startswith("model."))]
    return load_config(
        TINY_RTE,
        [*model, "data.task_name=wnli", f"data.data_dir={SHARED_GLUE}", f"output_dir={tmp_path / 'run'}",
         "train.num_epochs=null", "train.max_steps=2", "train.eval_every=1000", "data.max_train_samples=64",
         *overrides],
    )  # fmt: skip


def built_task(cfg, run_dir: Path) -> GLUETask:
    task = GLUETask(cfg)
    task.setup(Accelerator(), run_dir)
    return task


def tiny_tokenizer():
    texts = [sentence(i) for i in range(200)] + [
        l for l in (SHARED_GLUE / "WNLI" / "train.tsv").read_text().splitlines()
    ]
    return train_wordpiece(texts, 400, 64)


@needs_shared_data
def test_init_from_a_pretraining_run_final_dir(tmp_path):
    tokenizer = tiny_tokenizer()
    pretrained = RoFormerForMaskedLM(
        ModelConfig(vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                    max_position_embeddings=64, position="sinusoidal")
    )  # fmt: skip
    final = tmp_path / "pretrain" / "final"
    pretrained.save_pretrained(final)
    tokenizer.save_pretrained(final)

    cfg = wnli_config(tmp_path, f"init_from={tmp_path / 'pretrain'}")  # a run dir: its final/ is used
    task = built_task(cfg, tmp_path / "unit")
    model = task.build_model()
    assert cfg.model.hidden_size == 32 and cfg.model.position == "sinusoidal"  # resolved from the checkpoint
    assert cfg.model.vocab_size == len(tokenizer) and len(task.tokenizer) == len(tokenizer)
    for name, weight in pretrained.roformer.state_dict().items():
        torch.testing.assert_close(model.roformer.state_dict()[name], weight, msg=name)
    assert model.classifier.out_proj.out_features == 2

    results = train(wnli_config(tmp_path, f"init_from={final}"))
    run = tmp_path / "run"
    assert "eval/accuracy" in results
    assert load_config(run / "config.yaml").model.hidden_size == 32  # config.yaml is the resolved truth
    assert RoFormerForSequenceClassification.from_pretrained(run / "final").config.position == "sinusoidal"
    assert len((run / "WNLI.tsv").read_text().splitlines()) == 147


@needs_shared_data
def test_init_from_a_transformers_bert_checkpoint(tmp_path):
    vocab = tiny_tokenizer().get_vocab()
    bert_config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64,
    )  # fmt: skip
    masked_lm = transformers.BertForMaskedLM(bert_config).eval()
    masked_lm.save_pretrained(tmp_path / "bert")
    transformers.BertTokenizer(vocab=vocab).save_pretrained(tmp_path / "bert")

    cfg = wnli_config(tmp_path, f"init_from={tmp_path / 'bert'}")
    task = built_task(cfg, tmp_path / "unit")
    model = task.build_model().eval()
    assert (cfg.model.position, cfg.model.classifier_activation, cfg.model.vocab_size) == (
        "learned",
        "tanh",
        len(vocab),
    )
    torch.testing.assert_close(
        model.roformer.embeddings.word_embeddings.weight, masked_lm.bert.embeddings.word_embeddings.weight
    )
    batch = next(iter(task.eval_dataloader()))
    with torch.no_grad():  # our encoder computes what BERT's does on the same tokenized pairs
        ours = model.roformer(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).last_hidden_state
        theirs = masked_lm.bert(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).last_hidden_state
    mask = batch["attention_mask"].bool()
    length = batch["input_ids"].shape[1]
    terms = network_terms(2, 32, 64, length)
    assert_float32_close(ours[mask], theirs[mask], terms)
    assert task.pooler is None  # a masked-LM checkpoint has no trained pooler: the head starts fresh

    results = train(wnli_config(tmp_path, f"init_from={tmp_path / 'bert'}"))
    assert "eval/accuracy" in results and (tmp_path / "run" / "final" / "tokenizer.json").is_file()


@needs_shared_data
def test_a_bert_pooler_starts_the_classification_head(tmp_path):
    tokenizer = tiny_tokenizer()
    bert = transformers.BertModel(
        transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=64)
    )  # fmt: skip
    bert.save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    model = built_task(wnli_config(tmp_path, f"init_from={tmp_path / 'bert'}"), tmp_path / "unit").build_model()
    torch.testing.assert_close(model.classifier.dense.weight, bert.pooler.dense.weight)


# --------------------------------------------------------------------------------------------------
# Real runs
# --------------------------------------------------------------------------------------------------


@needs_shared_data
def test_a_real_batch_can_be_learned(tmp_path):
    """Inputs, token types and labels line up: a small model overfits one batch of real RTE pairs."""
    cfg = load_config(
        TINY_RTE,
        [*TINY_MODEL, f"data.data_dir={SHARED_GLUE}", "data.max_train_samples=64", "model.hidden_dropout=0.0",
         "model.attention_dropout=0.0"],
    )  # fmt: skip
    task = built_task(cfg, tmp_path)
    model = task.build_model()
    dataset, collate = task.train_dataset(), task.train_collator()
    batch = collate([dataset[int(i)] for i in task.epoch_batches(0, 32)[0]])
    assert batch["token_type_ids"].max() == 1 and batch["labels"].dtype == torch.long
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = task.loss(model, batch).item()
    for _ in range(40):
        loss = task.loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert first > 0.6 and loss.item() < 0.1


@pytest.mark.slow
@needs_shared_data
def test_short_real_rte_fine_tune_writes_metrics_model_and_submission(tmp_path):
    run = tmp_path / "rte"
    cfg = load_config(
        TINY_RTE,
        [*TINY_MODEL, f"data.data_dir={SHARED_GLUE}", f"output_dir={run}", "data.max_train_samples=320",
         "train.num_epochs=2", "train.eval_every=10"],
    )  # fmt: skip
    results = train(cfg)

    assert load_config(run / "config.yaml").train.max_steps == 20  # 2 epochs of 320 / 32
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [10, 20]
    final = json.loads((run / "eval_results.json").read_text())
    assert 0.0 <= final["eval/accuracy"] <= 1.0 and final["eval/accuracy"] == results["eval/accuracy"]
    assert (run / "best" / "best.json").is_file() and (run / "final" / "tokenizer.json").is_file()
    assert RoFormerForSequenceClassification.from_pretrained(run / "final").num_labels == 2

    lines = (run / "RTE.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 3001
    indices, labels = zip(*(line.split("\t") for line in lines[1:]))
    assert [int(i) for i in indices] == list(range(3000))
    assert set(labels) <= {"entailment", "not_entailment"}


WITHOUT_HUB_PACKAGES = """import sys
sys.modules["datasets"] = sys.modules["wandb"] = None  # as on a GPU image without them: importing either fails
from roformer.cli import main
code = main(sys.argv[1:])
loaded = sorted(name for name in sys.modules if name.split(".")[0] in ("datasets", "wandb") and sys.modules[name])
assert not loaded, loaded
sys.exit(code)
"""


@needs_shared_data
def test_local_glue_trains_and_evaluates_without_datasets_or_wandb(tmp_path):
    """GLUE from TSV files needs neither `datasets` (only hub names import it) nor `wandb` (log_with=none): the GPU
    image, which has neither, runs it (tests/test_gpu.py's GLUE step)."""
    import subprocess
    import sys

    run = tmp_path / "rte"
    overrides = [*TINY_MODEL, f"data.data_dir={SHARED_GLUE}", f"output_dir={run}", "data.max_train_samples=64",
                 "data.max_eval_samples=32", "train.num_epochs=null", "train.max_steps=2"]  # fmt: skip
    command = [sys.executable, "-c", WITHOUT_HUB_PACKAGES, "finetune", "--config", str(TINY_RTE), *overrides]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [2]  # logged at the last step
    assert 0.0 <= json.loads((run / "eval_results.json").read_text())["eval/accuracy"] <= 1.0


@pytest.mark.slow
def test_mnli_and_stsb_runs_score_both_dev_sets_and_write_each_submission(tmp_path):
    write_mnli(tmp_path / "glue" / "MNLI")
    write_stsb(tmp_path / "glue" / "STS-B")
    common = [*TINY_MODEL, f"data.data_dir={tmp_path / 'glue'}", "train.num_epochs=null", "train.max_steps=3"]
    mnli = train(load_config(TINY_RTE, [*common, "data.task_name=mnli", f"output_dir={tmp_path / 'mnli'}"]))
    assert {"eval/accuracy", "eval/accuracy_mm", "eval/loss_mm"} <= set(mnli)
    for stem in ("MNLI-m", "MNLI-mm"):
        lines = (tmp_path / "mnli" / f"{stem}.tsv").read_text().splitlines()
        assert len(lines) == 9 and {line.split("\t")[1] for line in lines[1:]} <= set(MNLI_LABELS)

    stsb = train(
        load_config(
            TINY_RTE,
            [*common, "data.task_name=stsb", f"output_dir={tmp_path / 'stsb'}", "train.best_metric=eval/spearman"],
        )
    )
    assert {"eval/pearson", "eval/spearman", "eval/loss"} <= set(stsb)
    scores = [float(line.split("\t")[1]) for line in (tmp_path / "stsb" / "STS-B.tsv").read_text().splitlines()[1:]]
    assert len(scores) == 10 and all(0.0 <= s <= 5.0 for s in scores)


# --------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------


def fake_run(root: Path, task: str, lr: str, seed: int, **metrics) -> None:
    out = root / task / f"lr{lr}_seed{seed}"
    out.mkdir(parents=True)
    (out / "eval_results.json").write_text(json.dumps({"step": 10, **metrics}))


def test_sweep_averages_seeds_and_reports_the_best_learning_rate(tmp_path, capsys):
    fake_run(tmp_path, "mrpc", "2e-05", 1, **{"eval/f1": 0.80, "eval/accuracy": 0.70})
    fake_run(tmp_path, "mrpc", "2e-05", 2, **{"eval/f1": 0.90, "eval/accuracy": 0.80})  # mean f1 0.85
    fake_run(tmp_path, "mrpc", "3e-05", 1, **{"eval/f1": 0.86, "eval/accuracy": 0.60})
    fake_run(tmp_path, "mrpc", "3e-05", 2, **{"eval/f1": 0.88, "eval/accuracy": 0.60})  # mean f1 0.87: best
    for seed, (m, mm) in ((1, (0.70, 0.72)), (2, (0.80, 0.74))):
        for lr in ("2e-05", "3e-05"):
            fake_run(tmp_path, "mnli", lr, seed, **{"eval/accuracy": m, "eval/accuracy_mm": mm})
    args = ["--tasks", "mrpc", "mnli", "--learning_rates", "2e-5", "3e-5", "--seeds", "1", "2"]
    code = main(["glue-sweep", *args, "--output_root", str(tmp_path), "--config_dir", str(REPO / "configs" / "glue")])
    printed = capsys.readouterr().out
    assert code == 0  # every run had finished: read back, nothing trained
    this_sweep = next(line for line in printed.splitlines() if line.startswith("this sweep (dev)"))
    assert this_sweep.split()[3:] == ["87.0", "-", "-", "-", "-", "75.0/73.0"]
    assert "RoFormer (paper, dev)" in printed and "89.5" in printed and "80.2/79.8" in printed
    assert "best lr 3e-05" in printed
    assert (tmp_path / "table2.txt").read_text().strip() in printed


def test_sweep_table_lists_the_papers_rows():
    report = format_report({}, [42])
    assert all(name in report for name in PAPER_TABLE2)
    assert "84.6/83.4" in report and "71.2" in report


def _row(report: str, name: str) -> list[str]:
    """The cells of Table 2's row `name` (MRPC, SST-2, QNLI, STS-B, QQP, MNLI)."""
    line = next(line for line in report.splitlines() if line.startswith(name + "  "))
    return line[len(name) :].split()


@needs_shared_data
def test_sweep_from_a_transformers_bert_directory_prints_the_labelled_baselines(tmp_path, capsys):
    """BERT on dev under the sweep's protocol: init_from a transformers BERT directory (a tiny learned-position
    model of ours converted by to_transformers), two Table 2 tasks, and the report labels the paper's BERT row
    as test-server scores beside the BERT-base dev baseline."""
    tokenizer = tiny_tokenizer()
    ours = RoFormerForMaskedLM(
        ModelConfig(vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                    max_position_embeddings=64, position="learned")
    )  # fmt: skip
    bert = to_transformers(ours)
    assert isinstance(bert, transformers.BertForMaskedLM)
    bert.save_pretrained(tmp_path / "bert")
    transformers.BertTokenizer(vocab=tokenizer.get_vocab()).save_pretrained(tmp_path / "bert")

    overrides = [f"init_from={tmp_path / 'bert'}", f"data.data_dir={SHARED_GLUE}", "data.max_seq_length=32",
                 "data.max_train_samples=32", "data.max_eval_samples=32", "train.num_epochs=null",
                 "train.max_steps=2", "train.per_device_batch_size=8", "train.mixed_precision=no",
                 "train.log_with=none", "train.eval_every=1000", "train.warmup_steps=0"]  # fmt: skip
    options = ["--tasks", "mrpc", "stsb", "--learning_rates", "5e-5", "--seeds", "1", "--output_root", str(tmp_path)]
    assert main(["glue-sweep", *overrides, *options, "--config_dir", str(REPO / "configs" / "glue")]) == 0
    report = capsys.readouterr().out
    assert load_config(tmp_path / "mrpc" / "lr5e-05_seed1" / "config.yaml").model.position == "learned"
    assert f"this sweep, from {tmp_path / 'bert'}:" in report
    assert _row(report, "BERT (paper, test server)") == ["88.9", "93.5", "90.5", "85.8", "71.2", "84.6/83.4"]
    assert _row(report, "BERT-base (run_glue, dev)") == ["88.9", "92.3", "90.7", "88.6", "87.5", "83.9/84.1"]
    assert _row(report, "RoFormer (paper, dev)")[0] == "89.5"
    sweep_row = _row(report, "this sweep (dev)")
    assert sweep_row[1:3] == ["-", "-"] and sweep_row[4:] == ["-", "-"]  # SST-2, QNLI, QQP, MNLI: not swept
    assert all(re.fullmatch(r"-?\d+\.\d", cell) for cell in (sweep_row[0], sweep_row[3]))  # MRPC F1, STS-B
    assert "test-server scores" in report and "not measured here" in report


@pytest.mark.slow
@needs_shared_data
def test_sweep_fine_tunes_in_process(tmp_path):
    overrides = [*TINY_MODEL, "init_from=null", f"data.data_dir={SHARED_GLUE}", "train.mixed_precision=no",
                 "train.num_epochs=null", "train.max_steps=2", "data.max_train_samples=64"]  # fmt: skip
    results = sweep(["wnli"], [3e-5], [7], tmp_path, REPO / "configs" / "glue", overrides)
    run = tmp_path / "wnli" / "lr3e-05_seed7"
    assert (run / "eval_results.json").is_file() and (run / "WNLI.tsv").is_file()
    cfg = load_config(run / "config.yaml")
    assert (cfg.train.learning_rate, cfg.train.seed) == (3e-5, 7)
    assert results["wnli"].best()[0] == 3e-5


def test_glue_table_lists_each_runs_headline_metrics(tmp_path, capsys):
    for run, task, results in [
        ("rotary", "mrpc", {"eval/accuracy": 0.70, "eval/f1": 0.8123}),
        ("rotary", "cola", {"eval/mcc": 0.05}),
        ("scratch", "mrpc", {"eval/accuracy": 0.68, "eval/f1": 0.80}),
    ]:
        (tmp_path / run / task).mkdir(parents=True)
        (tmp_path / run / task / "eval_results.json").write_text(json.dumps({"step": 10, **results}))
    assert main(["glue-table", str(tmp_path / "rotary"), str(tmp_path / "scratch")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| run | cola mcc | mrpc f1 |"  # GLUE's task order, headline metric of each
    assert lines[2:] == ["| rotary | 5.0 | 81.2 |", "| scratch | - | 80.0 |"]
    assert main(["glue-table", str(tmp_path / "missing")]) == 2
    assert "missing: no such directory" in capsys.readouterr().err


@needs_shared_data
def test_a_run_from_scratch_resumes_with_its_own_vocabulary(tmp_path, monkeypatch):
    """Issue 15: the resume branch of the tokenizer never set the model's vocabulary size (size mismatch)."""
    from roformer.trainer import Trainer

    with monkeypatch.context() as patch:  # stopped after step 2, as SIGTERM would stop it
        patch.setattr(Trainer, "_stop_requested", lambda self, stop: self.state.step == 2)
        assert train(wnli_config(tmp_path, "train.max_steps=4"))["status"] == "interrupted"
    results = train(wnli_config(tmp_path, "train.max_steps=4", "train.resume_from=latest"))
    assert "eval/accuracy" in results
    run = tmp_path / "run"
    vocabulary = len(load_tokenizer(run / "tokenizer"))
    assert load_config(run / "config.yaml").model.vocab_size == vocabulary
    assert RoFormerForSequenceClassification.from_pretrained(run / "final").config.vocab_size == vocabulary


@needs_shared_data
def test_training_batches_are_length_bucketed_and_cover_every_example_once(tmp_path):
    import numpy as np

    cfg = load_config(
        TINY_RTE, [*TINY_MODEL, f"data.data_dir={SHARED_GLUE}", "data.task_name=sst2", "data.max_train_samples=640"]
    )
    task = built_task(cfg, tmp_path)
    lengths = np.array([len(x) for x in task.train_set["input_ids"]])
    batches = task.epoch_batches(0, 16)
    assert sorted(np.concatenate(batches).tolist()) == list(range(640))  # every example, once
    assert [b.tolist() for b in task.epoch_batches(0, 16)] == [b.tolist() for b in batches]  # seeded
    assert [b.tolist() for b in task.epoch_batches(1, 16)] != [b.tolist() for b in batches]  # a new order each epoch
    padded = sum(len(b) * lengths[b].max() for b in batches)
    shuffled = np.random.default_rng(0).permutation(640)
    random_padded = sum(16 * lengths[shuffled[i : i + 16]].max() for i in range(0, 640, 16))
    assert padded < 0.8 * random_padded  # measured: 10,848 against 27,408 tokens for 10,192 real ones
