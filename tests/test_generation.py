"""Decoding (roformer.generation): greedy and beam search on the KV cache, against slower references."""

import pytest
import torch
from floats import float32_atol
from torch.testing import assert_close

from roformer import POSITION_SCHEMES, ConfigError, ModelConfig, RoFormerForSeq2SeqLM
from roformer.config import GenerationConfig, TranslationDataConfig
from roformer.generation import NEG_INF, beam_search, generate, greedy_search, topk_by_blocks
from roformer.modeling import ModelOutput

IDS = dict(bos_id=1, eos_id=2, pad_id=0)
VOCAB = 40
SEED = 0


@pytest.fixture(autouse=True)
def _one_thread():
    """Two OpenMP threads on two shared cores slow these small ops down by 10x or more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class EndsAtVaryingLengths(torch.nn.Module):
    """A model wrapper adding to the EOS logit a bonus that grows with the decoder position, at a rate read from
    the source's encoding. Random weights alone end every sentence at once or never; with this, sentences finish
    at different steps, which exercises dropping finished sentences from the batch (and their caches)."""

    def __init__(self, model: RoFormerForSeq2SeqLM):
        super().__init__()
        self.model, self.config = model, model.config

    def encode(self, input_ids, attention_mask=None):
        return self.model.encode(input_ids, attention_mask)

    def new_caches(self):
        return self.model.new_caches()

    def decode(self, decoder_input_ids, memory, attention_mask=None, caches=None):
        past = caches[0].self_attn.length if caches else 0  # read before decoding appends to the cache
        logits = self.model.decode(decoder_input_ids, memory, attention_mask, caches)
        positions = torch.arange(past, past + decoder_input_ids.shape[1], dtype=logits.dtype)  # (T,)
        rate = 6.0 * torch.sigmoid(memory[:, 0, :1])  # (B, 1): each sentence ends at its own pace
        rate = rate.repeat_interleave(logits.shape[0] // rate.shape[0], 0)  # the beams of a sentence share its memory
        logits[..., IDS["eos_id"]] += rate * (positions + 1) - 12.0
        return logits

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None):
        memory = self.encode(input_ids, attention_mask)
        return ModelOutput(logits=self.decode(decoder_input_ids, memory, attention_mask))


def random_model(position: str = "rotary") -> EndsAtVaryingLengths:
    """Weights of std 1 and an untied output layer (translations that vary with the source, unlike the small
    init), wrapped so that they end at varying lengths."""
    cfg = ModelConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        intermediate_size=64,
        position=position,
        scale_embeddings=True,
        embedding_layer_norm=False,
        type_vocab_size=0,
        tie_word_embeddings=False,
    )
    model = RoFormerForSeq2SeqLM(cfg).eval()
    torch.manual_seed(SEED)  # here, so the weights do not depend on how many draws the constructor makes
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 1.0)
    return EndsAtVaryingLengths(model).eval()


def sources(batch: int = 8, longest: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded sources of different lengths, each ending in EOS: (B, S) ids and mask."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.zeros(batch, longest, dtype=torch.long)
    for row in range(batch):
        n = int(torch.randint(2, longest + 1, (1,), generator=gen))
        ids[row, : n - 1] = torch.randint(4, VOCAB, (n - 1,), generator=gen)
        ids[row, n - 1] = IDS["eos_id"]
    return ids, ids.ne(0).long()


def test_the_test_model_is_not_degenerate():
    """Guards the tests below: their model must give translations of several lengths and more than one token."""
    ids, mask = sources()
    hyps = greedy_search(random_model(), ids, mask, max_len_b=12, **IDS)
    lengths = [len(t) for t in hyps.tokens]
    assert len(set(lengths)) >= 4 and sum(n < 12 for n in lengths) >= 4  # several end before the limit, apart
    assert max(len(set(t)) for t in hyps.tokens) >= 3


@pytest.mark.parametrize("position", ["rotary", "sinusoidal"])
def test_beam_one_equals_greedy(position):
    model, (ids, mask) = random_model(position), sources()
    greedy = greedy_search(model, ids, mask, max_len_b=12, **IDS)
    beam = beam_search(model, ids, mask, beam_size=1, max_len_b=12, **IDS)
    assert beam.tokens == greedy.tokens
    assert_close(beam.scores, greedy.scores)


@pytest.mark.parametrize("position", list(POSITION_SCHEMES))
@pytest.mark.parametrize("beam_size", [1, 4])
def test_cached_decoding_matches_recomputing_the_prefix(position, beam_size):
    """The KV cache (decoder keys/values appended, source keys/values computed once, both reordered as beams
    move and sentences finish) gives what recomputing every prefix from scratch gives."""
    model, (ids, mask) = random_model(position), sources()
    cached = generate(model, ids, mask, beam_size=beam_size, max_len_b=12, **IDS)
    recomputed = generate(model, ids, mask, beam_size=beam_size, max_len_b=12, use_cache=False, **IDS)
    assert cached.tokens == recomputed.tokens
    assert_close(cached.scores, recomputed.scores, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("length_penalty", [0.6, 1.0])
def test_scores_are_length_normalized_log_probs_of_the_hypotheses(length_penalty):
    """score = sum of log p(token | prefix, source) over the hypothesis and EOS / (length + 1) ** lenpen,
    recomputed here by teacher forcing each returned hypothesis."""
    model, (ids, mask) = random_model(), sources()
    hyps = beam_search(model, ids, mask, beam_size=4, length_penalty=length_penalty, max_len_b=12, **IDS)
    for row, tokens in enumerate(hyps.tokens):
        target = torch.tensor([*tokens, IDS["eos_id"]])
        decoder_input = torch.tensor([[IDS["bos_id"], *tokens]])
        with torch.no_grad():
            logits = model(ids[row : row + 1], mask[row : row + 1], decoder_input_ids=decoder_input).logits[0]
        log_prob = logits.float().log_softmax(-1).gather(1, target[:, None]).sum()
        assert_close(hyps.scores[row], log_prob / len(target) ** length_penalty, atol=1e-4, rtol=1e-4)


def test_a_sentence_translates_the_same_alone_or_in_a_batch():
    model, (ids, mask) = random_model(), sources()
    batched = beam_search(model, ids, mask, beam_size=4, max_len_b=12, **IDS)
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        alone = beam_search(model, ids[row : row + 1, :n], beam_size=4, max_len_b=12, **IDS)
        assert alone.tokens[0] == batched.tokens[row]
        assert_close(alone.scores[0], batched.scores[row], atol=1e-4, rtol=1e-4)


def test_a_beam_holding_every_prefix_finds_the_most_probable_translation():
    """Two tokens then EOS (forced by the length limits), a beam as wide as all first-token and second-token
    prefixes: beam search is then exhaustive and must return the brute-force argmax over all 37 x 37 pairs."""
    model, (ids, mask) = random_model(), sources(batch=2)
    usable = torch.arange(3, VOCAB)  # everything but pad, BOS, EOS
    n = len(usable)
    exact = dict(length_penalty=0.0, max_len_b=2, min_length=2, **IDS)
    found = beam_search(model, ids, mask, beam_size=n * n, **exact)
    greedy = greedy_search(model, ids, mask, **exact)
    first, second = usable.repeat_interleave(n), usable.repeat(n)  # all n * n pairs
    decoder_input = torch.stack((torch.full_like(first, IDS["bos_id"]), first, second), dim=1)
    target = torch.stack((first, second, torch.full_like(first, IDS["eos_id"])), dim=1)
    largest_logit = 0.0
    for row in range(ids.shape[0]):
        source = ids[row : row + 1, : int(mask[row].sum())].expand(n * n, -1)
        with torch.no_grad():
            logits = model(source, decoder_input_ids=decoder_input).logits
        totals = logits.float().log_softmax(-1).gather(2, target[..., None]).sum((1, 2))
        best = int(totals.argmax())
        assert found.tokens[row] == [int(first[best]), int(second[best])]
        assert_close(found.scores[row], totals[best], atol=1e-4, rtol=1e-4)
        largest_logit = max(largest_logit, float(logits.abs().max()))
    # Beam and greedy decode batches of different shapes, so their logits (sums over the hidden size) round
    # differently, and each score adds three log-probabilities: ties such as greedy finding the best pair too
    # differ by float32 noise (measured 1.7e-5 at -29.7 with AVX-512 kernels), never by more than this.
    noise = float32_atol(largest_logit, target.shape[1] * model.config.hidden_size)
    assert bool((found.scores >= greedy.scores - noise).all())


def test_length_limits():
    model, (ids, mask) = random_model(), sources()
    source_len = mask.sum(1) - 1  # without EOS
    for beam_size in (1, 4):
        capped = generate(model, ids, mask, beam_size=beam_size, max_len_a=1.0, max_len_b=0, **IDS)
        assert all(len(t) <= int(n) for t, n in zip(capped.tokens, source_len))
        exact = generate(model, ids, mask, beam_size=beam_size, max_len_b=5, min_length=5, **IDS)
        assert all(len(t) == 5 for t in exact.tokens)
        specials = {IDS["pad_id"], IDS["bos_id"], IDS["eos_id"]}
        assert not any(specials & set(t) for t in capped.tokens + exact.tokens)


@pytest.mark.parametrize("width", [32000, 32000 + 77, 500])
def test_topk_by_blocks_equals_topk(width):
    """Wide rows (a multiple of the block, not a multiple, narrower than k blocks), with the row's best entries
    crowded into one block and spread over many."""
    scores = torch.randn(6, width)
    scores[0, 256:264] += 10.0  # all eight winners in one block
    scores[1, ::4000] += 10.0  # one winner per block
    scores[2, -3:] += 10.0  # winners in the padded last block
    scores[3, 5:] = NEG_INF  # few finite entries
    expected_values, expected_index = scores.topk(8, dim=1)
    values, index = topk_by_blocks(scores, 8)
    assert torch.equal(values, expected_values)
    assert torch.equal(index[[0, 1, 2, 4, 5]], expected_index[[0, 1, 2, 4, 5]])
    assert torch.equal(scores.gather(1, index), values)  # -inf ties may pick other columns, of equal value
    assert index.max() < width and all(len(set(row)) == 8 for row in index.tolist())  # never the padding


def test_topk_by_blocks_never_returns_padding_columns_for_rows_mostly_minus_infinity():
    """Beam search at a sentence's length limit: every candidate but EOS is -inf. The padding of the last block
    ties with them and was once returned, an index past the row (seen as beam K of K: an IndexError)."""
    scores = torch.full((2, 3 * 300), NEG_INF)  # K = 3 beams of a 300-token vocabulary: 900 = 7 blocks + 4
    scores[:, [2, 302, 602]] = torch.tensor([-1.0, -2.0, -3.0])  # EOS of each beam
    values, index = topk_by_blocks(scores, 6)
    assert index.max() < 900 and all(len(set(row)) == 6 for row in index.tolist())
    assert index[:, :3].tolist() == [[2, 302, 602]] * 2 and torch.equal(scores.gather(1, index), values)


def test_one_generation_config_holds_the_decoding_defaults():
    """generate, beam search, BLEU evaluation, the CLI and the translation recipe share GenerationConfig."""
    assert TranslationDataConfig().generation() == GenerationConfig()
    recipe = TranslationDataConfig(beam_size=5, length_penalty=1.0, max_len_a=1.2, max_len_b=10)
    assert recipe.generation(beam_size=1) == GenerationConfig(1, 1.0, 1.2, 10)
    model, (ids, mask) = random_model(), sources()
    config = GenerationConfig(beam_size=3, length_penalty=1.0, max_len_b=9)
    by_config = generate(model, ids, mask, config, **IDS)
    by_keywords = beam_search(model, ids, mask, beam_size=3, length_penalty=1.0, max_len_b=9, **IDS)
    assert by_config.tokens == by_keywords.tokens and torch.equal(by_config.scores, by_keywords.scores)
    overridden = generate(model, ids, mask, config, beam_size=1, **IDS)  # a keyword overrides the config's field
    assert overridden.tokens == greedy_search(model, ids, mask, length_penalty=1.0, max_len_b=9, **IDS).tokens
    with pytest.raises(ConfigError, match="beam_size must be at least 1"):
        GenerationConfig(beam_size=0)
    with pytest.raises(TypeError):
        generate(model, ids, mask, beam=4, **IDS)  # not a setting: refused, never ignored
    from roformer.cli import build_parser

    args = build_parser().parse_args(["evaluate-bleu", "--src", "s", "--ref", "r"])
    assert (args.beam, args.lenpen, args.max_len_a, args.max_len_b) == (None,) * 4  # GenerationConfig decides
