"""Batched beam-search decoding speed: our RoFormerForSeq2SeqLM vs transformers' MarianMTModel.generate.

Same dimensions (layers, d_model, heads, FFN, joint vocabulary, shared embeddings), random weights, the same
source batch, beam 4, length penalty 0.6, both decoding on their KV caches, in the same process. For equal
work both produce exactly --new_tokens tokens per hypothesis: EOS is forbidden until then (ours: min_length;
Marian: min_new_tokens) and the length is capped there (ours: max_len_a=0, max_len_b=new_tokens-1, and the
last step is the forced EOS; Marian: max_new_tokens). Random weights would otherwise end at different
lengths. Models are timed round-robin (so load from other processes hits each alike) after one warm-up each;
the table gives the best of --repeats runs (timeit's convention: the least disturbed) and the median. Not part
of the test suite.

    python benchmarks/bench_translate.py                          # small (Multi30k recipe size), CPU
    python benchmarks/bench_translate.py --size base --device cuda # Transformer-base, 37k vocabulary
    python benchmarks/bench_translate.py --threads 1               # steadier numbers on a shared CPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SIZES = {
    # name: (layers, d_model, heads, ffn, vocab)
    "small": (3, 256, 4, 1024, 8000),
    "base": (6, 512, 8, 2048, 37000),
    "quick": (1, 64, 4, 128, 1000),
}
PAD, BOS, EOS = 0, 1, 2


def build_ours(size: str, position: str, attn: str):
    import roformer

    layers, hidden, heads, ffn, vocab = SIZES[size]
    cfg = roformer.ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=heads,
        intermediate_size=ffn,
        hidden_act="relu",
        position=position,
        scale_embeddings=True,
        embedding_layer_norm=False,
        type_vocab_size=0,
        layer_norm_eps=1e-5,
        attention_impl=attn,
    )
    return roformer.RoFormerForSeq2SeqLM(cfg).eval()


def build_marian(size: str, attn: str):
    import transformers

    layers, hidden, heads, ffn, vocab = SIZES[size]
    cfg = transformers.MarianConfig(
        vocab_size=vocab,
        decoder_vocab_size=vocab,
        d_model=hidden,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=ffn,
        decoder_ffn_dim=ffn,
        activation_function="relu",
        max_position_embeddings=1024,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        decoder_start_token_id=BOS,
        forced_eos_token_id=None,
        scale_embedding=True,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )
    cfg._attn_implementation = attn
    return transformers.MarianMTModel(cfg).eval()


def sources(batch: int, length: int, vocab: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpadded random sources ending in EOS: (B, S) ids and mask."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (batch, length), generator=gen)
    ids[:, -1] = EOS
    return ids.to(device), torch.ones_like(ids)


def decode_ours(model, ids, mask, args) -> int:
    from roformer.generation import beam_search

    out = beam_search(
        model,
        ids,
        mask,
        bos_id=BOS,
        eos_id=EOS,
        pad_id=PAD,
        beam_size=args.beam,
        length_penalty=args.lenpen,
        max_len_a=0.0,
        max_len_b=args.new_tokens - 1,
        min_length=args.new_tokens - 1,
    )
    return len(out.tokens[0]) + 1  # + the final EOS


def decode_marian(model, ids, mask, args) -> int:
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        num_beams=args.beam,
        length_penalty=args.lenpen,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        early_stopping=False,
        use_cache=True,
    )
    return out.shape[1] - 1  # without the decoder start token


def time_round_robin(models: dict, ids, mask, args) -> dict[str, list[float]]:
    """Seconds per call of each model, args.repeats times, alternating models; one warm-up call each first."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for name, (model, decode) in models.items():
            produced = decode(model, ids, mask, args)
            if produced != args.new_tokens:
                raise RuntimeError(f"{name} generated {produced} tokens per hypothesis, not {args.new_tokens}")
        for _ in range(args.repeats):
            for name, (model, decode) in models.items():
                if ids.is_cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                decode(model, ids, mask, args)
                if ids.is_cuda:
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--batch", type=int, default=16, help="source sentences per batch")
    parser.add_argument("--src_len", type=int, default=24, help="source tokens, EOS included")
    parser.add_argument("--new_tokens", type=int, default=24, help="tokens generated per hypothesis")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--lenpen", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="attention kernel, both models")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    layers, hidden, heads, ffn, vocab = SIZES[args.size]
    ids, mask = sources(args.batch, args.src_len, vocab, args.device)
    models = {}
    for name, build, decode in (
        ("ours rotary", lambda: build_ours(args.size, "rotary", args.attn), decode_ours),
        ("ours sinusoidal", lambda: build_ours(args.size, "sinusoidal", args.attn), decode_ours),
        ("transformers MarianMTModel", lambda: build_marian(args.size, args.attn), decode_marian),
    ):
        torch.manual_seed(0)
        models[name] = (build().to(args.device), decode)
    times = time_round_robin(models, ids, mask, args)

    print(
        f"beam {args.beam}, lenpen {args.lenpen}, {args.batch} sentences x {args.src_len} source tokens -> "
        f"{args.new_tokens} tokens each; {layers}+{layers} layers, d={hidden}, {heads} heads, FFN {ffn}, "
        f"vocab {vocab}; {args.attn} attention; {args.device}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    reference = min(times["transformers MarianMTModel"])
    print(
        f"| {'model':<28} | {'sentences/s':>11} | {'ms/batch best':>13} | {'ms/batch median':>15} | {'vs Marian':>9} |"
    )
    print(f"|{'-' * 30}|{'-' * 12}:|{'-' * 14}:|{'-' * 16}:|{'-' * 10}:|")
    for name, runs in times.items():
        best, median = min(runs), statistics.median(runs)
        print(
            f"| {name:<28} | {args.batch / best:>11.1f} | {best * 1e3:>13.1f} | {median * 1e3:>15.1f} "
            f"| {reference / best:>8.2f}x |"
        )


if __name__ == "__main__":
    main()
