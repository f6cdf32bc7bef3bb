"""Decoding for `RoFormerForSeq2SeqLM`: greedy search and batched beam search with a length penalty.

Both run the decoder incrementally: the source is encoded once, the cross-attention keys/values of the
source are computed at the first step and kept (`LayerCache.cross_attn`), and each step feeds only the newest
token, attending to the cached keys/values of the earlier ones (`LayerCache.self_attn`). `use_cache=False`
recomputes the whole prefix at every step instead: the slow reference the cached path is tested against.

Beam search follows fairseq's `SequenceGenerator`:
- every live hypothesis of a sentence is extended by every token and the 2K best candidates are kept;
  candidates ending in EOS among the first K are finished, the first K others live on;
- a sentence is done when it has K finished hypotheses (or reaches its maximum length, where EOS is forced);
- length penalty, fairseq's convention: a finished hypothesis scores  sum of token log-probs / length ** lenpen,
  length counting the generated tokens including EOS. (GNMT's ((5 + length) / 6) ** alpha is the other
  convention; Vaswani et al. give alpha = 0.6 without saying which; fairseq's is used here.)
- maximum length per sentence: max_len_a * source length + max_len_b tokens before EOS (fairseq-generate's
  defaults are a=0, b=200), source length counting the real tokens without EOS. Per sentence rather than per
  batch, so a translation never depends on the sentences it was batched with.

Pad and BOS are never generated. Beam 1 is greedy search (tested). The settings (beam, length penalty, length
limits) come in one `GenerationConfig` (roformer/config.py); keywords of the same names override its fields.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from roformer.config import GenerationConfig

NEG_INF = -math.inf


@dataclass
class Hypotheses:
    """The best translation of each sentence of a batch."""

    tokens: list[list[int]]
    """Per sentence, the generated ids without BOS and EOS."""
    scores: torch.Tensor
    """(B,) sum of log-probs (EOS included) / length ** length_penalty."""


class _Decoder:
    """One decoder step for the live hypotheses of the live sentences, with the KV cache (only the newest token
    goes in) or without it.

    The source side (memory, its padding mask, the cross-attention keys/values) is kept once per sentence and read
    by all its hypotheses: with the cache, `single_query_attention` groups the beams of a sentence, so they never
    copy or reorder it. The decoder's own keys/values are kept per hypothesis and follow the beams.
    """

    def __init__(self, model, memory: torch.Tensor, attention_mask: torch.Tensor, use_cache: bool):
        self.model, self.memory, self.mask = model, memory, attention_mask
        # linear attention has no KV cache: its decoder recomputes the prefix (correct, quadratic in length)
        use_cache = use_cache and model.config.attention == "softmax"
        self.caches = model.new_caches() if use_cache else None
        self.rows_per_sentence = 1  # hypotheses decoded per sentence: 1 at the first step (all beams share BOS)
        self._log_probs: torch.Tensor | None = None

    def log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (N, t), BOS first, N a multiple of the live sentences. Returns next-token log-probs (N, V), in
        a buffer that the next call overwrites."""
        if self.caches is not None:
            logits = self.model.decode(tokens[:, -1:], self.memory, self.mask, self.caches)[:, -1]
        else:  # the uncached reference recomputes everything, the source's keys too: one memory row per hypothesis
            beams = tokens.shape[0] // self.memory.shape[0]
            memory, mask = self.memory.repeat_interleave(beams, 0), self.mask.repeat_interleave(beams, 0)
            logits = self.model.decode(tokens, memory, mask)[:, -1]
        logits = logits.float()
        if self._log_probs is None or self._log_probs.shape != logits.shape:
            self._log_probs = torch.empty_like(logits)  # reused: a fresh (N, V) array per step costs page faults
        return torch.log_softmax(logits, dim=-1, out=self._log_probs)

    def advance(self, parents: torch.Tensor) -> None:
        """Each sentence's hypotheses go on from `parents` (n, K): for each, the one it extends."""
        if self.caches is not None:
            rows = hypothesis_rows(
                torch.arange(parents.shape[0], device=parents.device), parents, self.rows_per_sentence
            )
            for cache in self.caches:
                cache.self_attn.reorder(rows)
        self.rows_per_sentence = parents.shape[1]

    def keep(self, sentences: torch.Tensor) -> None:
        """Only `sentences` (indices of the live ones, in order) go on, with all their hypotheses."""
        self.memory, self.mask = self.memory.index_select(0, sentences), self.mask.index_select(0, sentences)
        if self.caches is not None:
            every = torch.arange(self.rows_per_sentence, device=sentences.device)
            rows = hypothesis_rows(sentences, every, self.rows_per_sentence)
            for cache in self.caches:
                cache.self_attn.reorder(rows)
                cache.cross_attn.reorder(sentences)


def hypothesis_rows(sentences: torch.Tensor, hypotheses: torch.Tensor, per_sentence: int) -> torch.Tensor:
    """Flat row indices, sentence-major, of `hypotheses` ((n, h) or (h,), each 0 .. per_sentence - 1) of
    `sentences` ((n,)), in a batch holding `per_sentence` rows per sentence."""
    return (sentences[:, None] * per_sentence + hypotheses).view(-1)


def max_lengths(input_ids: torch.Tensor, attention_mask: torch.Tensor, eos_id: int, a: float, b: int) -> torch.Tensor:
    """(B,) longest allowed translation (tokens before EOS) for each source: int(a * source length + b)."""
    source_len = (attention_mask.bool() & input_ids.ne(eos_id)).sum(1)
    return (a * source_len.double() + b).long().clamp_min(0)


def _constrain(lprobs: torch.Tensor, step: int, max_len: torch.Tensor, min_length: int, ids: dict) -> torch.Tensor:
    """lprobs: (n, K, V) at decoding step `step` (0-based); max_len: (n,). Never pad or BOS; no EOS before
    `min_length` tokens; only EOS once a sentence has `max_len` tokens."""
    eos = ids["eos"]
    at_max = step >= max_len
    ending = bool(at_max.any())
    eos_lp = lprobs[..., eos].clone() if ending else None
    lprobs[..., ids["pad"]] = NEG_INF
    lprobs[..., ids["bos"]] = NEG_INF
    if step < min_length:
        lprobs[..., eos] = NEG_INF
    if ending:
        lprobs[at_max] = NEG_INF
        lprobs[..., eos] = torch.where(at_max[:, None], eos_lp, lprobs[..., eos])
    return lprobs


def topk_by_blocks(x: torch.Tensor, k: int, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x.topk(k, dim=1) for a wide (n, w) x, some 3x faster on CPU at beam search's k = 8 of 4 x 8000 scores.

    The k largest entries of a row lie in the k blocks with the largest maxima: an entry in any other block is
    below k block maxima, so k entries beat it. Only those k blocks are searched. Rows are padded with -inf to
    whole blocks; ties may come out in another order than torch.topk's (which does not promise one either).
    """
    rows, width = x.shape
    if width < k * block:
        return x.topk(k, dim=1)
    padded = torch.nn.functional.pad(x, (0, block - width % block), value=NEG_INF) if width % block else x
    blocks = padded.view(rows, -1, block)
    best_blocks = blocks.amax(dim=-1).topk(k, dim=1, sorted=False).indices  # (n, k), in any order
    first_block = torch.arange(rows, device=x.device)[:, None] * blocks.shape[1]
    candidates = blocks.flatten(0, 1).index_select(0, (first_block + best_blocks).view(-1)).view(rows, -1)
    values, where = candidates.topk(k, dim=1)  # of the (n, k * block) candidates
    index = best_blocks.gather(1, where // block) * block + where % block
    if width % block and bool(index.amax() >= width):  # a row with fewer than k entries above -inf took padding
        return x.topk(k, dim=1)
    return values, index


def _prepare(model, input_ids, attention_mask, pad_id, eos_id, config: GenerationConfig):
    if attention_mask is None:
        attention_mask = input_ids.ne(pad_id).long()
    memory = model.encode(input_ids, attention_mask)  # (B, S, H), once
    return attention_mask, memory, max_lengths(input_ids, attention_mask, eos_id, config.max_len_a, config.max_len_b)


@torch.no_grad()
def greedy_search(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    use_cache: bool = True,
    **settings,
) -> Hypotheses:
    """The most probable next token at every step. input_ids: (B, S) sources ending in EOS, right-padded.
    `settings` override fields of `config` (length_penalty, max_len_a, max_len_b, min_length); beam_size is
    ignored."""
    config = (config or GenerationConfig()).replace(**settings)
    length_penalty, min_length = config.length_penalty, config.min_length
    ids = {"bos": bos_id, "eos": eos_id, "pad": pad_id}
    attention_mask, memory, max_len = _prepare(model, input_ids, attention_mask, pad_id, eos_id, config)
    batch = input_ids.shape[0]
    decoder = _Decoder(model, memory, attention_mask, use_cache)
    tokens = input_ids.new_full((batch, 1), bos_id)
    scores = memory.new_zeros(batch, dtype=torch.float32)
    alive = torch.arange(batch, device=input_ids.device)  # original index of each live row
    out_tokens: list[list[int]] = [[] for _ in range(batch)]
    out_scores = torch.zeros(batch)
    for step in range(int(max_len.max()) + 1):
        lprobs = _constrain(decoder.log_probs(tokens)[:, None], step, max_len[alive], min_length, ids)[:, 0]
        best, token = lprobs.max(-1)
        scores = scores + best
        tokens = torch.cat((tokens, token[:, None]), dim=1)
        ended = token.eq(eos_id)
        for row in ended.nonzero()[:, 0].tolist():
            out_tokens[alive[row]] = tokens[row, 1:-1].tolist()
            out_scores[alive[row]] = scores[row].item() / (step + 1) ** length_penalty
        if ended.all():
            break
        if ended.any():
            rows = (~ended).nonzero()[:, 0]
            tokens, scores, alive = tokens[rows], scores[rows], alive[rows]
            decoder.keep(rows)
    return Hypotheses(out_tokens, out_scores)


@torch.no_grad()
def beam_search(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    use_cache: bool = True,
    **settings,
) -> Hypotheses:
    """Batched beam search (fairseq's rules, see the module docstring). input_ids: (B, S) sources ending in EOS,
    right-padded. The B * K hypotheses are decoded together as one batch; finished sentences leave it.
    `settings` override fields of `config`."""
    config = (config or GenerationConfig()).replace(**settings)
    length_penalty, min_length = config.length_penalty, config.min_length
    ids = {"bos": bos_id, "eos": eos_id, "pad": pad_id}
    attention_mask, memory, max_len = _prepare(model, input_ids, attention_mask, pad_id, eos_id, config)
    batch, k, device = input_ids.shape[0], config.beam_size, input_ids.device
    decoder = _Decoder(model, memory, attention_mask, use_cache)
    tokens = input_ids.new_full((batch, 1), bos_id)  # (n * K, t) from step 1 on
    scores = torch.full((batch, k), NEG_INF, device=device)  # (n, K) sum of log-probs
    scores[:, 0] = 0.0  # all K beams start identical: expand only the first at step 0
    alive = list(range(batch))  # the original index of each live sentence
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    offsets = torch.arange(2 * k, device=device)
    for step in range(int(max_len.max()) + 1):
        n = len(alive)
        lprobs = decoder.log_probs(tokens)
        if step == 0:
            # every beam starts from BOS: decoded once per sentence, copied to K rows for the search
            rows = torch.arange(batch, device=device).repeat_interleave(k)
            lprobs, tokens = lprobs[rows], tokens[rows]
        lprobs = _constrain(lprobs.view(n, k, -1), step, max_len, min_length, ids)
        vocab = lprobs.shape[-1]
        cand_scores, cand = topk_by_blocks(lprobs.add_(scores[:, :, None]).view(n, -1), 2 * k)  # (n, 2K)
        cand_beams, cand_tokens = cand // vocab, cand % vocab
        is_eos = cand_tokens.eq(eos_id)

        # EOS among the K best finishes a hypothesis
        finishing = is_eos[:, :k] & cand_scores[:, :k].isfinite()
        for i, j in finishing.nonzero().tolist():
            sentence = alive[i]
            if len(finished[sentence]) < k:
                hypothesis = tokens[i * k + cand_beams[i, j], 1:].tolist()
                finished[sentence].append((cand_scores[i, j].item() / (step + 1) ** length_penalty, hypothesis))
        done = torch.tensor([len(finished[s]) >= k for s in alive], device=device) | (step >= max_len)

        # the first K candidates that are not EOS live on
        live = (is_eos.long() * 2 * k + offsets).topk(k, dim=1, largest=False).indices  # (n, K)
        scores, parents = cand_scores.gather(1, live), cand_beams.gather(1, live)
        source_rows = hypothesis_rows(torch.arange(n, device=device), parents, k)
        tokens = torch.cat((tokens[source_rows], cand_tokens.gather(1, live).view(-1, 1)), dim=1)
        if done.all():
            break
        decoder.advance(parents if step else torch.zeros_like(parents))  # at step 0 all go on from the one BOS
        if done.any():
            kept = (~done).nonzero()[:, 0]
            kept_rows = hypothesis_rows(kept, torch.arange(k, device=device), k)
            tokens, scores, max_len = tokens[kept_rows], scores[kept], max_len[kept]
            alive = [alive[i] for i in kept.tolist()]
            decoder.keep(kept)

    best = [max(hyps, key=lambda h: h[0]) for hyps in finished]
    return Hypotheses([h[1] for h in best], torch.tensor([h[0] for h in best]))


def generate(model, input_ids, attention_mask=None, config: GenerationConfig | None = None, **kwargs) -> Hypotheses:
    """Beam search, or greedy search when the beam is 1 (the same result, less bookkeeping). `kwargs`: the token
    ids, use_cache, and settings that override fields of `config`."""
    settings = {f.name: kwargs.pop(f.name) for f in dataclasses.fields(GenerationConfig) if f.name in kwargs}
    config = (config or GenerationConfig()).replace(**settings)
    search = greedy_search if config.beam_size == 1 else beam_search
    return search(model, input_ids, attention_mask, config, **kwargs)
