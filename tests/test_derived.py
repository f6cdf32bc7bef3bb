"""Tensors derived from parameters and kept between inference calls (roformer.kernels.derived)."""

import torch
from torch.testing import assert_close

import roformer
from roformer.kernels.derived import derived


def test_kept_while_sources_are_unchanged_and_rebuilt_after_an_in_place_update():
    layer = torch.nn.Linear(3, 4)
    builds = []

    def transposed():
        builds.append(1)
        return layer.weight.t().contiguous()

    with torch.no_grad():
        first = derived(layer, "_t", (layer.weight,), transposed)
        assert derived(layer, "_t", (layer.weight,), transposed) is first
        layer.weight.add_(1.0)  # what an optimizer step or load_state_dict does
        updated = derived(layer, "_t", (layer.weight,), transposed)
    assert len(builds) == 2
    assert_close(updated, layer.weight.t())
    assert "_t" not in layer.state_dict()


def test_rebuilt_with_autograd_on_so_gradients_reach_the_sources():
    layer = torch.nn.Linear(3, 4)
    stack = lambda: torch.cat((layer.weight, layer.weight))  # noqa: E731
    with torch.no_grad():
        derived(layer, "_stack", (layer.weight,), stack)
    stacked = derived(layer, "_stack", (layer.weight,), stack)
    assert "_stack" not in layer.__dict__  # training forgets the kept copy: it would go stale
    stacked.sum().backward()
    assert_close(layer.weight.grad, torch.full_like(layer.weight, 2.0))


def test_decoding_follows_weights_loaded_after_an_earlier_decode(tiny_config):
    """A kept q/k/v stack or transposed output matrix must not outlive the weights it came from."""
    cfg = tiny_config(num_decoder_layers=2)
    model, other = roformer.RoFormerForSeq2SeqLM(cfg).eval(), roformer.RoFormerForSeq2SeqLM(cfg).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.normal_()
    source, target = torch.randint(1, 97, (2, 6)), torch.randint(1, 97, (2, 4))
    with torch.no_grad():
        model.decode(target, model.encode(source))  # fills the kept tensors from the first weights
        model.load_state_dict(other.state_dict())
        actual = model.decode(target, model.encode(source))
        expected = other.decode(target, other.encode(source))
    assert_close(actual, expected)


def test_a_training_forward_forgets_the_kept_output_matrix(tiny_config):
    model = roformer.RoFormerForSeq2SeqLM(tiny_config(num_decoder_layers=1)).eval()
    source, target = torch.randint(1, 97, (2, 6)), torch.randint(1, 97, (2, 4))
    with torch.no_grad():
        model.decode(target, model.encode(source))
    assert "_lm_head_t" in model.__dict__
    model.decode(target, model.encode(source)).sum().backward()
    assert "_lm_head_t" not in model.__dict__
