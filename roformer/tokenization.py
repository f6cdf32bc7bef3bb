"""Tokenizers trained with the `tokenizers` library.

Training is not bit-for-bit repeatable: `tokenizers` breaks ties between equally frequent merges in hash-map
order, which changes from process to process. A run therefore saves its tokenizer and a resumed run reuses it,
and runs that are compared share one saved tokenizer (`data.tokenizer=RUN/tokenizer`).
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from roformer.errors import DataError

BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(documents: list[str], vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """A lowercased BERT WordPiece tokenizer trained on `documents`, with [CLS] A [SEP] (B [SEP]) templates."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIAL_TOKENS, min_frequency=2)
    tok.train_from_iterator(documents, trainer=trainer)
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


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """A tokenizer directory written by `save_pretrained` (a run's tokenizer/ or final/)."""
    if not Path(path).is_dir():
        raise DataError(f"{path}: not a tokenizer directory")
    return AutoTokenizer.from_pretrained(str(path))
