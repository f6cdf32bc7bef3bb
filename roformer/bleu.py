"""BLEU for translation models: translate a file with a trained model and score it with sacreBLEU.

Two numbers, clearly apart:
- **sacreBLEU** (`bleu`): detokenized hypotheses against the raw references with sacreBLEU's defaults (13a
  tokenization, mixed case, exp smoothing); reported with its signature. This is the number to compare.
- **tokenized BLEU** (`tok_bleu`): sacreBLEU with `tokenize='intl'`, which splits every punctuation mark and
  symbol, in-word hyphens included, much like Moses tokenization followed by tensor2tensor's compound splitting
  (`get_ende_bleu.sh`), the usual recipe behind the paper-era "tokenized BLEU" on WMT14 En-De (Vaswani et al.:
  27.3; RoFormer: 27.5). The RoFormer paper does not say how it tokenized; compare this one with care.

Token id conventions shared with the translation task: a source is its BPE ids followed by EOS; the decoder
starts from BOS (see `roformer.generation`).
"""

from __future__ import annotations

from pathlib import Path

import sacrebleu
import torch
from tqdm.auto import tqdm

from roformer.config import GenerationConfig
from roformer.data_files import read_line_aligned, read_utf8
from roformer.errors import DataError, UserError
from roformer.generation import generate

TOKENIZED_BLEU_LABEL = "tokenized BLEU (sacrebleu tokenize=intl: punctuation and in-word hyphens split)"


# --------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------


def bleu_scores(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU of detokenized `hypotheses` against one reference each.

    Returns {'bleu', 'bleu_signature', 'bleu_detail', 'tok_bleu', 'tok_bleu_signature'}.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    detok = sacrebleu.BLEU()
    score = detok.corpus_score(hypotheses, [references])
    tok = sacrebleu.BLEU(tokenize="intl")
    tok_score = tok.corpus_score(hypotheses, [references])
    return {
        "bleu": score.score,
        "bleu_signature": str(detok.get_signature()),
        "bleu_detail": str(score),
        "tok_bleu": tok_score.score,
        "tok_bleu_signature": str(tok.get_signature()),
    }


# --------------------------------------------------------------------------------------------------
# Token ids <-> text
# --------------------------------------------------------------------------------------------------


def encode_sources(tokenizer, lines: list[str], max_length: int | None = None) -> list[list[int]]:
    """BPE ids of each line followed by EOS; with max_length, cut to max_length tokens (EOS kept last)."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(lines, add_special_tokens=False, verbose=False)["input_ids"] if lines else []
    if max_length is not None:
        ids = [row[: max_length - 1] for row in ids]
    return [row + [eos] for row in ids]


def pad_batch(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists to (B, T) input_ids and their (B, T) attention_mask."""
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        mask[i, : len(row)] = 1
    return ids, mask


def decode_hypotheses(tokenizer, token_lists: list[list[int]]) -> list[str]:
    """Generated ids (without BOS/EOS) -> detokenized text."""
    return tokenizer.batch_decode(token_lists, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def generation_ids(tokenizer) -> dict[str, int]:
    return {"bos_id": tokenizer.bos_token_id, "eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id}


# --------------------------------------------------------------------------------------------------
# Translating a file
# --------------------------------------------------------------------------------------------------


def load_translator(checkpoint: str | Path):
    """(model, tokenizer) from a run's final/ directory (or any save_pretrained directory with a tokenizer)."""
    from transformers import PreTrainedTokenizerFast

    from roformer.modeling import RoFormerForSeq2SeqLM, load_pretrained, read_model_meta

    path = Path(checkpoint)
    if not (path / "config.json").is_file():
        raise UserError(f"--checkpoint {path}: no config.json here (expected a run's final/ directory)")
    architecture = read_model_meta(path).get("architecture")
    if architecture != RoFormerForSeq2SeqLM.__name__:
        raise UserError(f"--checkpoint {path}: holds a {architecture}, not a translation model (RoFormerForSeq2SeqLM)")
    if not (path / "tokenizer.json").is_file():
        raise UserError(f"--checkpoint {path}: no tokenizer.json here (a run's final/ directory has one)")
    return load_pretrained(path).eval(), PreTrainedTokenizerFast.from_pretrained(str(path))


@torch.no_grad()
def translate_lines(
    model,
    tokenizer,
    lines: list[str],
    config: GenerationConfig | None = None,
    *,
    batch_size: int = 64,
    progress: bool = False,
    **settings,
) -> list[str]:
    """Translate `lines` in batches of similar length; returns the translations in the input order. `settings`
    override fields of `config` (beam_size, length_penalty, max_len_a, max_len_b)."""
    config = (config or GenerationConfig()).replace(**settings)
    device = next(model.parameters()).device
    sources = encode_sources(tokenizer, lines)
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))  # little padding per batch
    translations: list[str] = [""] * len(lines)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="translate", disable=not progress):
        chunk = order[start : start + batch_size]
        ids, mask = pad_batch([sources[i] for i in chunk], tokenizer.pad_token_id)
        hyps = generate(
            model,
            ids.to(device),
            mask.to(device),
            config,
            **generation_ids(tokenizer),
        )
        for i, text in zip(chunk, decode_hypotheses(tokenizer, hyps.tokens)):
            translations[i] = text
    return translations


def check_generation_args(beam_size: int, max_len_a: float, max_len_b: int, batch_size: int, lenpen: float) -> None:
    """Numbers a translation command accepts, checked before any work (names as on the command line)."""
    import math

    limits = (("--beam", beam_size, 1), ("--batch_size", batch_size, 1), ("--max_len_b", max_len_b, 0))
    for flag, value, least in limits:
        if value < least:
            raise UserError(f"{flag}={value}: must be at least {least}")
    if not (math.isfinite(max_len_a) and max_len_a >= 0):
        raise UserError(f"--max_len_a={max_len_a}: must be a number at least 0")
    if not math.isfinite(lenpen):
        raise UserError(f"--lenpen={lenpen}: must be a finite number")
    if max_len_a == 0 and max_len_b == 0:
        raise UserError("--max_len_a=0 and --max_len_b=0 allow no token at all; give a positive --max_len_b")


def resolve_device(device: str | None) -> torch.device:
    """--device as torch names it; a GPU that is not there is refused here rather than deep in torch."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device={device}: not a device name (cpu, cuda, cuda:1, mps, ...)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device={device}: no CUDA GPU is available here; use --device cpu")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise UserError(f"--device={device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device={device}: MPS is not available here; use --device cpu")
    return resolved


def check_fits_positions(model, tokenizer, lines: list[str], max_len_a: float, max_len_b: int) -> None:
    """A learned position table has max_position_embeddings rows: the longest allowed translation (BOS + tokens)
    must fit, or decoding would fail midway with a message about the input."""
    from roformer.positions import scheme_class

    rows = scheme_class(model.config.position).max_length(model.config)
    if rows is None:  # no table to run past
        return
    longest_source = max((len(row) - 1 for row in encode_sources(tokenizer, lines)), default=0)
    longest = int(max_len_a * longest_source + max_len_b)
    if longest + 1 > rows:
        raise UserError(
            f"--max_len_a={max_len_a} --max_len_b={max_len_b} allow translations of {longest} tokens, but the "
            f"model's learned position table has {rows} rows (at most {rows - 1} tokens after BOS); lower them"
        )


def evaluate_bleu(
    src: str | Path,
    ref: str | Path,
    checkpoint: str | Path | None = None,
    hyp: str | Path | None = None,
    out: str | Path | None = None,
    device: str | None = None,
    generation: GenerationConfig | None = None,
    batch_size: int = 64,
) -> dict:
    """Translate `src` with `checkpoint` (or read ready translations from `hyp`) and score them against `ref`.

    `generation`: the decoding settings (default: GenerationConfig's); `batch_size`: sentences per batch.
    Returns `bleu_scores(...)` plus 'sentences'.
    """
    sources, references = read_line_aligned(src, ref)
    if hyp is not None:
        hypotheses = read_utf8(hyp).splitlines()
        if len(hypotheses) != len(references):
            raise DataError(f"{hyp} has {len(hypotheses)} lines but {ref} has {len(references)}")
    else:
        if checkpoint is None:
            raise UserError("give --checkpoint (a model to translate with) or --hyp (translations to score)")
        model, tokenizer = load_translator(checkpoint)
        model.to(resolve_device(device))
        generation = generation or GenerationConfig()
        check_fits_positions(model, tokenizer, sources, generation.max_len_a, generation.max_len_b)
        hypotheses = translate_lines(model, tokenizer, sources, generation, batch_size=batch_size, progress=True)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("".join(h + "\n" for h in hypotheses), encoding="utf-8")
    return {"sentences": len(hypotheses), **bleu_scores(hypotheses, references)}


def format_scores(scores: dict) -> str:
    """Human-readable lines: sacreBLEU with its signature, then the tokenized BLEU, labelled."""
    return (
        f"sacreBLEU (detokenized) = {scores['bleu']:.2f}  {scores['bleu_signature']}\n"
        f"  {scores['bleu_detail']}\n"
        f"{TOKENIZED_BLEU_LABEL} = {scores['tok_bleu']:.2f}  {scores['tok_bleu_signature']}"
    )
