"""CUDA-only checks (`pytest -m gpu`, run by `make gpu-check` on a GPU machine); skipped where there is no GPU.

Each compares the GPU path with the reference it must equal or approach: bf16 against fp32 on the same weights,
a short real run whose loss falls, an exact-position resume, a GLUE step, and beam search against the CPU."""

from pathlib import Path

import pytest
import torch

from roformer import ModelConfig, RoFormerForMaskedLM

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT.parent / "shared" / "data" / "glue"
# The built-in corpus (Python's documentation): a GPU machine may have no ../shared/data beside the checkout.
SMALL = ["data.corpus=builtin", "data.max_seq_length=128",
         "data.tokenizer_vocab_size=4000", "model.hidden_size=256", "model.num_layers=4", "model.num_heads=4",
         "model.intermediate_size=1024", "model.max_position_embeddings=128", "train.global_batch_size=32",
         "train.log_every=5", "train.eval_every=1000", "train.max_eval_batches=4", "train.log_with=none"]  # fmt: skip


def run(tmp_path, name, *extra):
    from accelerate.state import AcceleratorState

    from roformer.config import load_config
    from roformer.trainer import train

    AcceleratorState._reset_state()
    cfg = load_config(ROOT / "configs" / "pretrain" / "tiny.yaml", [*SMALL, f"output_dir={tmp_path / name}", *extra])
    return train(cfg), tmp_path / name


def losses(run_dir):
    from roformer.tracking import read_metrics

    return [(r["step"], r["train/loss"]) for r in read_metrics(run_dir) if "train/loss" in r]


@pytest.mark.parametrize("position", ["rotary", "sinusoidal", "learned"])
def test_bf16_autocast_logits_stay_close_to_fp32(position):
    """bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%); over 4 layers the logits move by a few percent of
    their spread, and the loss by well under 1%."""
    cfg = ModelConfig(vocab_size=8000, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024,
                      position=position, hidden_dropout=0.0, attention_dropout=0.0)  # fmt: skip
    model = RoFormerForMaskedLM(cfg).cuda().eval()
    ids = torch.randint(5, cfg.vocab_size, (8, 128), device="cuda")
    labels = torch.where(torch.rand(ids.shape, device="cuda") < 0.15, ids, -100)
    with torch.no_grad():
        full = model(ids)
        ref_logits, ref_loss = full.logits.float(), model(ids, labels=labels).loss
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low_logits, low_loss = model(ids).logits.float(), model(ids, labels=labels).loss
    spread = ref_logits.std()
    assert (low_logits - ref_logits).abs().max() < 0.1 * spread
    assert low_loss.float() == pytest.approx(ref_loss.float(), rel=1e-2)


def test_a_short_bf16_run_learns_and_logs_mfu(tmp_path):
    results, run_dir = run(tmp_path, "learn", "train.max_steps=60", "train.learning_rate=1e-3", "train.warmup_steps=5")
    from roformer.config import load_config
    from roformer.tracking import read_metrics

    assert load_config(run_dir / "config.yaml").train.mixed_precision == "bf16"  # auto on a GPU
    seen = [loss for _, loss in losses(run_dir)]
    assert seen[-1] < seen[0] - 1.0
    assert all(0 < r["train/mfu"] < 1 for r in read_metrics(run_dir) if "train/mfu" in r)


def test_a_resumed_gpu_run_continues_from_its_position(tmp_path):
    """cuBLAS may pick other kernels after a restart: the resumed losses match the straight run closely, not bit
    for bit as on the CPU."""
    from roformer.trainer import Trainer

    _, straight = run(tmp_path, "straight", "train.max_steps=10", "train.save_every=100")
    stop_at_6 = Trainer._stop_requested
    Trainer._stop_requested = lambda self, stop: self.state.step == 6
    try:
        run(tmp_path, "resumed", "train.max_steps=10", "train.save_every=100")
    finally:
        Trainer._stop_requested = stop_at_6
    run(tmp_path, "resumed", "train.max_steps=10", "train.save_every=100", "train.resume_from=latest")
    a, b = losses(straight), losses(tmp_path / "resumed")
    assert [s for s, _ in a] == [s for s, _ in b]
    for (_, x), (_, y) in zip(a, b):
        assert y == pytest.approx(x, rel=1e-2)


def test_a_glue_step_on_the_gpu(tmp_path):
    if not GLUE.is_dir():
        pytest.skip(f"no GLUE data at {GLUE}")
    from roformer.config import load_config
    from roformer.trainer import train

    glue = GLUE
    cfg = load_config(ROOT / "configs" / "glue" / "tiny_rte.yaml",
                      [f"data.data_dir={glue}", "data.max_train_samples=64", "data.max_eval_samples=32",
                       "train.num_epochs=null", "train.max_steps=2", f"output_dir={tmp_path / 'rte'}",
                       "train.log_with=none"])  # fmt: skip
    assert "eval/accuracy" in train(cfg)


def test_beam_search_on_the_gpu_finds_the_cpu_translations():
    from roformer import RoFormerForSeq2SeqLM
    from roformer.generation import generate

    cfg = ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                      intermediate_size=128, type_vocab_size=0, hidden_dropout=0.0, attention_dropout=0.0)  # fmt: skip
    model = RoFormerForSeq2SeqLM(cfg).eval()
    ids = torch.randint(4, 300, (6, 12))
    ids[:, -1] = 2  # EOS
    mask = torch.ones_like(ids)
    special = {"bos_id": 1, "eos_id": 2, "pad_id": 0}
    with torch.no_grad():
        cpu = generate(model, ids, mask, beam_size=4, max_len_b=16, **special)
        gpu = generate(model.cuda(), ids.cuda(), mask.cuda(), beam_size=4, max_len_b=16, **special)
    assert gpu.tokens == cpu.tokens
    torch.testing.assert_close(gpu.scores.cpu(), cpu.scores, rtol=1e-4, atol=1e-4)
