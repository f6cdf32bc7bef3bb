"""MLM data: documents from every kind of source, the prepared token stream, blocks, seeded masking."""

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from roformer.config import MLMDataConfig
from roformer.corpus import Source, documents, split_documents
from roformer.errors import DataError
from roformer.tasks.mlm import MaskingCollator, PackedBlocks, corpus_sources, prepare_corpus
from roformer.tokenization import load_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKITEXT = DATA / "text" / "wikitext2.valid.txt"
SHAKESPEARE = DATA / "text" / "tiny_shakespeare.txt"


def test_wikitext_articles_become_documents():
    lines = [" = Valkyria = ", "", " Some text . ", " = = History = = ", " More . ", " = Tower = ", " Other . "]
    docs = list(split_documents(lines, titled=True))
    assert docs == ["= Valkyria = Some text . = = History = = More .", "= Tower = Other ."]


def test_plain_text_paragraphs_become_documents():
    assert list(split_documents(["First:", "Hello.", "", "", "Second:", "Bye."], titled=False)) == [
        "First: Hello.",
        "Second: Bye.",
    ]


def test_every_file_format_is_one_stream_of_documents(tmp_path):
    (tmp_path / "a.txt").write_text("one two\nthree\n\nfour\n")
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("five six\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "seven"}) + "\n" + json.dumps({"text": "eight"}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [1, 2], "text": ["nine", "ten"]}), tmp_path / "d.parquet")
    docs = list(documents([Source(files=[str(tmp_path)])]))
    assert docs == ["one two three", "four", "five six", "seven", "eight", "nine", "ten"]
    assert list(documents([Source(files=[str(tmp_path / "*.jsonl")], weight=1.5)])) == ["seven", "eight", "eight"]


def test_a_hub_dataset_with_one_article_per_row_gives_one_document_per_row(tmp_path):
    """The layout of wikimedia/wikipedia (id, url, title, text), read through datasets' streaming loader from a
    local directory, as the hub would serve it; no text column is a one-line error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    hub = tmp_path / "wiki"
    hub.mkdir()
    articles = [f"Article {i}.\n\nIt has two paragraphs, the second about {i}." for i in range(60)]
    table = pa.table({"id": [str(i) for i in range(60)], "url": ["u"] * 60, "title": ["t"] * 60, "text": articles})
    pq.write_table(table, hub / "train-00000-of-00001.parquet")
    data = MLMDataConfig(corpus="hub", hub_name=str(hub))
    train, validation = corpus_sources(data)
    assert list(documents(train)) == articles and validation == []
    with pytest.raises(DataError, match="no text column 'body'; columns: id, url, title, text"):
        list(documents(corpus_sources(MLMDataConfig(corpus="hub", hub_name=str(hub), text_column="body"))[0]))


def _prepare(tmp_path, **data):
    cfg = MLMDataConfig(corpus="files", train_files=[str(WIKITEXT)], tokenizer_vocab_size=1200, max_seq_length=64,
                        **data)  # fmt: skip
    return cfg, prepare_corpus(cfg, tmp_path / "prepared", num_proc=1)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return _prepare(tmp_path_factory.mktemp("mlm"))


def test_the_prepared_stream_is_every_document_tokenized_with_sep_between(prepared):
    cfg, dataset = prepared
    tok = load_tokenizer(dataset.tokenizer_dir)
    docs = list(documents(corpus_sources(cfg)[0]))
    held_out = [i for i in range(len(docs)) if math.ceil((i + 1) * 0.2) > math.ceil(i * 0.2)]  # 1 in 5, from the first
    expected = {"train": [], "validation": []}
    for i, doc in enumerate(docs):
        ids = tok(doc, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
        expected["validation" if i in held_out else "train"].extend(ids)
    for split in ("train", "validation"):
        stream = dataset.stream(split, "tokens")
        assert stream.tokens(0, len(stream)).tolist() == expected[split]
    assert dataset.manifest["counts"]["validation"]["documents"] == len(held_out)
    assert dataset.manifest["dtype"] == "<u2" and dataset.block_length == 64


def test_blocks_are_full_length_cuts_of_the_stream(prepared):
    _, dataset = prepared
    tok = load_tokenizer(dataset.tokenizer_dir)
    stream = dataset.stream("train", "tokens")
    blocks = PackedBlocks(stream, 64, tok.cls_token_id, tok.sep_token_id)
    assert len(blocks) == len(stream) // 62
    body = np.concatenate([blocks[k]["input_ids"][1:-1] for k in range(len(blocks))])
    assert body.tolist() == stream.tokens(0, len(blocks) * 62).tolist()
    assert all(blocks[k]["input_ids"][0] == tok.cls_token_id and len(blocks[k]["input_ids"]) == 64 for k in (0, 5))
    assert blocks[len(blocks) + 3]["input_ids"].tolist() == blocks[3]["input_ids"].tolist()  # a later epoch's key


def test_validation_is_capped_in_blocks(tmp_path):
    _, dataset = _prepare(tmp_path, max_validation_blocks=10)
    # WikiText's articles are long: the first held-out article already holds more than 10 blocks, so it is the only one
    assert dataset.manifest["counts"]["validation"]["documents"] == 1
    assert len(dataset.stream("validation", "tokens")) > 10 * 62


def test_masking_rate_80_10_10_and_seeds_by_position_in_the_data(prepared):
    _, dataset = prepared
    tok = load_tokenizer(dataset.tokenizer_dir)
    blocks = PackedBlocks(dataset.stream("train", "tokens"), 64, tok.cls_token_id, tok.sep_token_id)
    collate = MaskingCollator(tok, 0.15, seed=7)
    items = [blocks[k] for k in range(64)]
    out = collate(items)
    chosen = out["labels"] != -100
    special = torch.isin(torch.from_numpy(np.stack([i["input_ids"] for i in items])), torch.tensor(tok.all_special_ids))
    assert not chosen[special].any()  # never [CLS] or [SEP]
    assert chosen[~special].float().mean().item() == pytest.approx(0.15, abs=0.02)
    assert ((out["input_ids"] == tok.mask_token_id) & chosen).sum() / chosen.sum() == pytest.approx(0.8, abs=0.05)
    assert "attention_mask" not in out  # full blocks: nothing to mask out
    assert out["masked_width"] == int(chosen.sum(1).max())  # a plain int: the model's bound, known on the host
    # the same block at the same position masks the same in any batch; a later epoch (key + len) masks anew
    assert torch.equal(collate(items[32:])["labels"], out["labels"][32:])
    later = collate([blocks[k + len(blocks)] for k in range(64)])
    assert not torch.equal(later["labels"], out["labels"])


def test_bad_sources_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="nothing.txt: file not found"):
        prepare_corpus(MLMDataConfig(corpus="files", train_files=[str(tmp_path / "nothing.txt")]), tmp_path / "p")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="empty.txt: the source holds no text"):
        prepare_corpus(MLMDataConfig(corpus="files", train_files=[str(tmp_path / "empty.txt")]), tmp_path / "p")
    (tmp_path / "short.txt").write_text("a few words\n\nand some more\n")
    with pytest.raises(DataError, match="the corpus is too small"):
        prepare_corpus(MLMDataConfig(corpus="files", train_files=[str(tmp_path / "short.txt")]), tmp_path / "p")
    assert not (tmp_path / "p").exists() and not (tmp_path / "p.partial").exists()  # nothing half-written


def test_builtin_corpus_is_python_documentation():
    from roformer.builtin_corpus import builtin_documents

    docs = builtin_documents()
    words = sum(len(d.split()) for d in docs)
    assert words > 250_000
    assert any("lambda" in d for d in docs[:100])  # the language reference topics come first
