"""MLM data pieces: documents, packing, the reproducible tokenizer, seeded masking, the built-in corpus."""

from pathlib import Path

import pytest
import torch

from roformer.config import MLMDataConfig
from roformer.errors import DataError
from roformer.tasks.mlm import BlockCollator, SeededMasker, load_corpus, pack_documents, split_documents
from roformer.tokenization import train_wordpiece

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKITEXT = DATA / "text" / "wikitext2.valid.txt"


def test_wikitext_articles_become_documents():
    lines = [" = Valkyria = ", "", " Some text . ", " = = History = = ", " More . ", " = Tower = ", " Other . "]
    assert split_documents(lines) == ["= Valkyria = Some text . = = History = = More .", "= Tower = Other ."]


def test_plain_text_paragraphs_become_documents():
    assert split_documents(["First:", "Hello.", "", "", "Second:", "Bye."]) == ["First: Hello.", "Second: Bye."]


@pytest.mark.parametrize("block_size", [8, 16, 64])
def test_packing_keeps_every_token_in_order_within_block_size(block_size):
    docs = [list(range(100, 100 + n)) for n in (3, 30, 1, 7, 12, 5)]
    blocks = pack_documents(docs, block_size, cls_id=1, sep_id=2)
    assert all(len(b) <= block_size and b[0] == 1 and b[-1] == 2 for b in blocks)
    inner = [t for b in blocks for t in b[1:-1] if t != 2]
    assert inner == [t for d in docs for t in d]
    # a short document is never split across two blocks
    for doc in docs:
        if len(doc) <= block_size - 2:
            assert any(doc == b[i : i + len(doc)] for b in blocks for i in range(len(b))), doc


def test_wordpiece_has_bert_special_tokens_and_template():
    docs = split_documents(WIKITEXT.read_text(encoding="utf-8").splitlines()[:400])
    tok = train_wordpiece(docs, 1500, 128)
    assert len(tok) == 1500
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pair = tok("the tower", "is tall")
    assert pair["input_ids"][0] == tok.cls_token_id and pair["input_ids"][-1] == tok.sep_token_id
    assert pair["token_type_ids"][-1] == 1 and pair["token_type_ids"][0] == 0


@pytest.fixture(scope="module")
def masker_and_batch():
    docs = split_documents(WIKITEXT.read_text(encoding="utf-8").splitlines()[:400])
    tok = train_wordpiece(docs, 1500, 128)
    ids = tok(docs[:40], add_special_tokens=False)["input_ids"]
    blocks = pack_documents(ids, 64, tok.cls_token_id, tok.sep_token_id)
    examples = [{"input_ids": b, "example_index": i} for i, b in enumerate(blocks)]
    batch = BlockCollator(tok.pad_token_id, tok.all_special_ids)(examples[:16])
    return SeededMasker(tok, 0.15, seed=7), batch, tok


def test_masking_rate_and_80_10_10(masker_and_batch):
    masker, batch, tok = masker_and_batch
    masked = torch.stack([masker(batch, salt=s)["labels"] != -100 for s in range(40)])
    maskable = (batch["special_tokens_mask"] == 0).expand_as(masked)
    assert not masked[~maskable].any()  # never [CLS], [SEP] or padding
    assert masked[maskable].float().mean().item() == pytest.approx(0.15, abs=0.01)
    out = masker(batch, salt=3)
    chosen = out["labels"] != -100
    as_mask = (out["input_ids"] == tok.mask_token_id) & chosen
    assert as_mask.sum() / chosen.sum() == pytest.approx(0.8, abs=0.1)


def test_masks_are_seeded_by_step_and_example_not_by_batch(masker_and_batch):
    masker, batch, _ = masker_and_batch
    full = masker(batch, salt=5)
    assert torch.equal(full["labels"], masker(batch, salt=5)["labels"])  # same step: same masks
    assert not torch.equal(full["labels"], masker(batch, salt=6)["labels"])  # next step: new masks
    half = {k: v[8:] for k, v in batch.items()}  # the same examples in another batch (another process)
    assert torch.equal(full["labels"][8:], masker(half, salt=5)["labels"])


def test_held_out_fraction_splits_documents():
    data = MLMDataConfig(corpus="files", train_files=[str(WIKITEXT)], validation_fraction=0.2)
    train, valid = load_corpus(data, seed=1)
    assert len(valid) == round((len(train) + len(valid)) * 0.2)
    assert not set(train) & set(valid)
    assert load_corpus(data, seed=1) == (train, valid)


def test_missing_train_files_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="nothing.txt: file not found"):
        load_corpus(MLMDataConfig(corpus="files", train_files=[str(tmp_path / "nothing.txt")]), seed=0)


def test_builtin_corpus_is_python_documentation():
    from roformer.builtin_corpus import builtin_documents

    docs = builtin_documents()
    words = sum(len(d.split()) for d in docs)
    assert words > 250_000
    assert any("lambda" in d for d in docs[:100])  # the language reference topics come first
