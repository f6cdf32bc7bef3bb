"""Model FLOPs per trained token and model FLOPs utilisation (MFU), as PaLM (Chowdhery et al., appendix B) and
nanoGPT count them: the matrix products of the forward pass, times 3 for forward + backward; embedding lookups,
norms, activations and the softmax are not counted.

An encoder layer at sequence length T, hidden d, feed-forward f, per token (forward):
    q, k, v and output projections  2 * 4 d^2
    feed-forward                    2 * 2 d f
    scores q.k and the weighted v   2 * 2 T d
The masked-LM head (dense d x e, vocabulary e x V) counts at the predicted positions only, a fraction p of the
tokens, because that is all the task needs (MosaicBERT and Cramming count it so): 2 p (d e + e V).
The count is of the model's maths, not of what a kernel does: our last layer at the masked rows only
(modeling.py) makes the hardware do less, and MFU does not flatter it.
"""

from __future__ import annotations

from roformer.config import ModelConfig

# Dense bf16 tensor-core peaks (NVIDIA data sheets), matched against torch.cuda.get_device_name(); the first
# name found in the device's name wins, so more specific names come first.
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H200": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 125e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,  # fp16: V100 has no bf16
}


def encoder_layer_flops(cfg: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs of one encoder layer, per token."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    return 2 * 4 * d * d + 2 * 2 * d * f + 2 * 2 * seq_len * d


def mlm_training_flops_per_token(cfg: ModelConfig, seq_len: int, predicted_fraction: float) -> float:
    """Forward + backward FLOPs per input token of masked-LM training (see the module docstring)."""
    d, e, v = cfg.hidden_size, cfg.embedding_dim, cfg.vocab_size
    projection = 2 * cfg.embedding_dim * d if cfg.embedding_dim != d else 0
    head = 2 * (d * e + e * v) * predicted_fraction
    return 3 * (cfg.num_layers * encoder_layer_flops(cfg, seq_len) + projection + head)


def classifier_training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token of sequence classification (the head, once per sequence, is negligible)."""
    projection = 2 * cfg.embedding_dim * cfg.hidden_size if cfg.embedding_dim != cfg.hidden_size else 0
    return 3 * (cfg.num_layers * encoder_layer_flops(cfg, seq_len) + projection)


def device_peak_flops(device_name: str) -> float | None:
    """The bf16 peak of a known GPU, by name; None when unknown (set train.peak_tflops)."""
    for name, peak in PEAK_BF16_FLOPS.items():
        if name in device_name:
            return peak
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: the fraction of the device's peak the training throughput amounts to."""
    return flops_per_token * tokens_per_s / peak_flops
