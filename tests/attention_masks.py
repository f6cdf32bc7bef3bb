"""The masks the attention tests run every kernel under: none, padding (two sequences padded), causal, both."""

import torch

from roformer.modeling import combine_masks, padding_mask
from roformer.positions import causal_mask

B, T = 3, 9


def padding() -> torch.Tensor:
    """(B, T) attention mask: the second sequence padded after 6 tokens, the third after 2."""
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, 6:] = 0
    attention_mask[2, 2:] = 0
    return attention_mask


MASKS = {
    "none": lambda: None,
    "padding": lambda: padding_mask(padding()),
    "causal": lambda: causal_mask(T, T, torch.device("cpu")),
    "padding+causal": lambda: combine_masks(padding_mask(padding()), causal_mask(T, T, torch.device("cpu"))),
}
