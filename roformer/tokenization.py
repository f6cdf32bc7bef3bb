"""Tokenizers trained with the `tokenizers` library, repeatably.

`tokenizers`' WordPiece trainer breaks ties between equally frequent merges by symbol id, and it numbers the
word-continuation symbols (`##a`, `##b`, ...) in hash-map order, which changes from process to process: left
alone, two processes learn different vocabularies from the same text. Declaring every continuation symbol up
front, in sorted order, fixes their ids, so the same text and settings give the same vocabulary, byte for byte,
in any process (tests/test_tokenization.py). The BPE trainer used for translation numbers its alphabet sorted
and is repeatable as it is.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from roformer.errors import DataError

BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CONTINUATION = "##"


def train_wordpiece(documents: Iterable[str], vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """A lowercased BERT WordPiece tokenizer trained on `documents`, with [CLS] A [SEP] (B [SEP]) templates.

    Deterministic: the vocabulary depends only on the text and the settings."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    documents = list(documents)
    normalizer = normalizers.BertNormalizer(lowercase=True)
    raw = set().union(*map(set, documents))  # the normalizer works character by character: normalize each once
    alphabet = sorted({c for r in raw for c in normalizer.normalize_str(r) if not c.isspace()})
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=BERT_SPECIAL_TOKENS + [CONTINUATION + c for c in alphabet],  # fixed ids: see the docstring
        min_frequency=2,
        show_progress=False,
    )
    from roformer.prepare import pieces

    tok.train_from_iterator((piece for doc in documents for piece in pieces(doc)), trainer=trainer)
    # Rebuilt from the learned vocabulary, so only the five real special tokens are special.
    vocab = tok.get_vocab()
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix=CONTINUATION))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.add_special_tokens(BERT_SPECIAL_TOKENS)
    tok.decoder = decoders.WordPiece()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],  # pairs carry segment ids (GLUE)
    )


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """A short hash of what decides token ids: the vocabulary, normalizer, pre-tokenizer and special tokens."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    keep = {k: state.get(k) for k in ("normalizer", "pre_tokenizer", "model", "added_tokens")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """A tokenizer directory written by `save_pretrained` (a run's tokenizer/ or final/)."""
    if not Path(path).is_dir():
        raise DataError(f"{path}: not a tokenizer directory")
    return AutoTokenizer.from_pretrained(str(path))
