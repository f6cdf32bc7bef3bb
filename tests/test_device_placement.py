"""No tensor made on the CPU meets a device tensor, and no value is read back to the host, inside a training step:
the models run forward and backward with their weights and inputs on the `meta` device, where a CPU tensor made
inside (positions, masks, tables, biases) or a read-back (`.item()`, `int(t.max())`, `bool(t.all())`) fails
loudly. (The masked-row MLM head sizes its rows from the labels, a read-back: it runs under the check below,
in training and in evaluation.)

Evaluation and decoding read values (metrics, which hypotheses finished), which `meta` has not. There a fake
device stands in (`HostTensorCheck`): weights and batches stay on the CPU with real values and count as "on the
device"; a tensor made without naming a device (`torch.zeros(n)`, `torch.tensor([...])`, `torch.from_numpy`:
on a GPU machine, a CPU tensor), or sent to the host (`.cpu()`, `device="cpu"`), counts as "on the host", and so
does what is computed from host tensors alone. An operation that meets both fails, as CUDA would: host and
device tensors with dimensions (CUDA takes 0-dim CPU tensors as scalars, and CPU index tensors into a device
tensor). Moving a host tensor with `.to(device)` puts it on the device. Blind spots: tensors made inside C++
(not through torch's Python functions), and `device=torch.device("cpu")` written out, which reads as a device.

Fixed, and pinned here: every forward used to read positions and masks back to the host (a GPU sync per
forward): `int(position_ids.max())` for the rotary and sinusoidal tables and the learned length check, the
consecutive-positions test of the relative biases (ALiBi, T5), `bool(attention_mask.all())` in `padding_mask`.
The model now makes its positions as Python ranges, known on the host.
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from roformer import (
    POSITION_SCHEMES,
    ModelConfig,
    RoFormerForMaskedLM,
    RoFormerForSeq2SeqLM,
    RoFormerForSequenceClassification,
)

META = torch.device("meta")


class HostTensorCheck(TorchFunctionMode):
    """Fails where a host tensor meets a device tensor; see the module docstring. Host tensors carry an attribute."""

    FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
                 torch.rand, torch.randn, torch.randint, torch.randperm, torch.linspace, torch.eye,
                 torch.scalar_tensor}  # fmt: skip
    INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}

    @staticmethod
    def on_host(t) -> bool:
        return isinstance(t, torch.Tensor) and getattr(t, "_on_host", False)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        placed = [a for a in (*args[1:], kwargs.get("device")) if isinstance(a, torch.device | str)]
        if func in self.FACTORIES:
            device = kwargs.get("device")
            host = device is None or isinstance(device, str) and device.startswith("cpu")
        elif func in (torch.Tensor.cpu, torch.from_numpy):
            host = True
        elif func is torch.Tensor.to and placed:  # (on the CPU, `.to` may return its input itself: re-marked)
            host = any(isinstance(a, str) and a.startswith("cpu") for a in placed)
        else:
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            if func in self.INDEXING:  # a host index into a device tensor is fine; the other way round is not
                tensors = tensors[:1] + [t for t in tensors[1:] if not self.on_host(t)]
            sized = [t for t in tensors if t.dim() > 0]
            if any(map(self.on_host, sized)) and not all(map(self.on_host, sized)):
                shapes = [(tuple(t.shape), "host" if self.on_host(t) else "device") for t in tensors]
                raise AssertionError(f"{getattr(func, '__name__', func)}: a host tensor meets a device tensor {shapes}")
            host = bool(tensors) and all(map(self.on_host, tensors))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and (host or self.on_host(t)):
                t._on_host = host
        return out


def config(position: str, **extra) -> ModelConfig:
    return ModelConfig(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                       max_position_embeddings=64, position=position, **extra)  # fmt: skip


@pytest.mark.parametrize("position", list(POSITION_SCHEMES))
@pytest.mark.parametrize("padded", [False, True])
def test_an_encoder_training_step_makes_no_cpu_tensor(position, padded):
    with META:
        mlm = RoFormerForMaskedLM(config(position)).train()
        classifier = RoFormerForSequenceClassification(config(position), num_labels=3).train()
    ids = torch.randint(5, 101, (2, 16), device=META)
    mask = torch.ones(2, 16, dtype=torch.long, device=META) if padded else None
    logits = mlm(ids, attention_mask=mask).logits
    F.cross_entropy(logits.flatten(0, 1), torch.randint(0, 101, (32,), device=META), ignore_index=-100).backward()
    out = classifier(ids, attention_mask=mask, labels=torch.randint(0, 3, (2,), device=META))
    out.loss.backward()
    assert out.logits.device == META


@pytest.mark.parametrize("position", list(POSITION_SCHEMES))
def test_a_translation_training_step_makes_no_cpu_tensor(position):
    with META:
        model = RoFormerForSeq2SeqLM(config(position, num_decoder_layers=2, type_vocab_size=0)).train()
    ids = torch.randint(4, 101, (2, 12), device=META)
    decoder_ids = torch.randint(4, 101, (2, 9), device=META)
    out = model(ids, torch.ones_like(ids), decoder_input_ids=decoder_ids, labels=decoder_ids, label_smoothing=0.1)
    out.loss.backward()
    assert out.loss.device == META


# --------------------------------------------------------------------------------------------------
# Evaluation and decoding: real values on the CPU, host tensors marked
# --------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TINY_MODEL = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=4", "model.intermediate_size=64",
              "train.log_with=none"]  # fmt: skip


def evaluate_with_meta_default(task_name: str, recipe: str, overrides: list[str], tmp_path) -> dict:
    """Set the task up, collate two evaluation batches (data loading makes host tensors by design, which the
    trainer then moves), then evaluate with the batches and the model counting as on the device."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from roformer.config import load_config
    from roformer.tasks import get_task_class

    cfg = load_config(ROOT / "configs" / recipe, [*TINY_MODEL, *overrides, f"output_dir={tmp_path / task_name}"])
    AcceleratorState._reset_state()  # the state is per process: leave none behind for later tests
    try:
        task, accelerator = get_task_class(task_name)(cfg), Accelerator(cpu=True)
        task.setup(accelerator, tmp_path / task_name)
        model = task.build_model().eval()
        batches = [batch for _, batch in zip(range(2), task.eval_dataloader())]
        with torch.no_grad(), HostTensorCheck():
            metrics = task.evaluate(model, batches, accelerator)
    finally:
        AcceleratorState._reset_state()
    assert metrics and all(isinstance(v, float) for v in metrics.values())
    return metrics


def test_mlm_evaluation_makes_no_tensor_without_a_device(tmp_path):
    files = DATA / "text" / "wikitext2.valid.txt"
    if not files.is_file():
        pytest.skip(f"no {files}")
    overrides = ["data.corpus=files", f"data.train_files={files}", "data.max_documents=40", "data.max_seq_length=32",
                 "data.tokenizer_vocab_size=500", "model.max_position_embeddings=32"]  # fmt: skip
    assert evaluate_with_meta_default("mlm", "pretrain/tiny.yaml", overrides, tmp_path)["mlm_accuracy"] >= 0


def test_glue_evaluation_makes_no_tensor_without_a_device(tmp_path):
    if not (DATA / "glue" / "RTE").is_dir():
        pytest.skip("no ../shared/data/glue")
    overrides = [f"data.data_dir={DATA / 'glue'}", "data.max_train_samples=32", "data.max_eval_samples=16",
                 "data.tokenizer_vocab_size=500", "data.max_seq_length=32", "model.max_position_embeddings=32",
                 "train.per_device_batch_size=8"]  # fmt: skip
    assert 0 <= evaluate_with_meta_default("glue", "glue/tiny_rte.yaml", overrides, tmp_path)["accuracy"] <= 1


@pytest.mark.parametrize("beam", [1, 3])
def test_translation_evaluation_and_decoding_make_no_tensor_without_a_device(tmp_path, beam, monkeypatch):
    """The dev loss and BLEU of greedy (beam 1, as evaluate() decodes) or beam-search translations (as the final
    evaluation decodes, through the same path): every decoding step included."""
    from roformer.tasks.translation import TranslationTask

    multi30k = DATA / "multi30k"
    if not (multi30k / "train.en").is_file():
        pytest.skip("no ../shared/data/multi30k")
    overrides = ["model.num_decoder_layers=2", "data.max_train_samples=64", "data.max_eval_samples=8",
                 "data.bpe_vocab_size=300", "data.max_tokens=256", "data.max_len_b=6",
                 f"data.train_prefix={multi30k / 'train'}", f"data.valid_prefix={multi30k / 'val'}",
                 f"data.test_prefix={multi30k / 'test_2016_flickr'}"]  # fmt: skip

    def decode(self, model, loader, accelerator, max_batches=None):
        return self._decode_split(model, loader, accelerator, self.valid_split, beam, max_batches)[0]

    monkeypatch.setattr(TranslationTask, "evaluate", decode)
    assert evaluate_with_meta_default("translation", "wmt14/multi30k_small.yaml", overrides, tmp_path)["bleu"] >= 0


@pytest.mark.parametrize("position", list(POSITION_SCHEMES))
@pytest.mark.parametrize("beam", [1, 4])
def test_decoding_makes_no_tensor_without_a_device(position, beam):
    """Greedy and beam search with the KV cache, padded sources, sentences finishing at different steps."""
    from roformer.generation import generate

    model = RoFormerForSeq2SeqLM(config(position, num_decoder_layers=2, type_vocab_size=0)).eval()
    ids = torch.randint(4, 101, (3, 10))
    ids[0, 6:], ids[1, 9:] = 0, 0  # right-padded
    ids[0, 5], ids[1, 8], ids[2, 9] = 2, 2, 2  # EOS
    with HostTensorCheck():
        out = generate(model, ids, ids.ne(0), beam_size=beam, max_len_b=8, bos_id=1, eos_id=2, pad_id=0)
    assert len(out.tokens) == 3 and out.scores.shape == (3,)


def test_the_host_tensor_check_catches_what_cuda_refuses():
    """The check itself: the bug class of issue 13 (transformers' masking built its probabilities on the CPU and
    filled them with a device mask), and what CUDA allows."""
    device_tensor = torch.ones(4, 3)
    with HostTensorCheck():
        with pytest.raises(AssertionError, match="host tensor meets a device tensor"):
            torch.full((4, 3), 0.15).masked_fill_(device_tensor.bool(), 0.0)
        with pytest.raises(AssertionError):
            device_tensor + torch.arange(3).cpu()
        device_tensor + torch.tensor(2.0)  # a 0-dim CPU tensor is a scalar to CUDA
        device_tensor[torch.tensor([0, 2])]  # a CPU index into a device tensor
        moved = torch.arange(3).to(device_tensor.device)
        assert (device_tensor + moved).shape == (4, 3)
        assert (device_tensor + torch.arange(3, device=device_tensor.device)).shape == (4, 3)


@pytest.mark.parametrize("position", list(POSITION_SCHEMES))
def test_a_masked_lm_step_at_the_masked_rows_makes_no_tensor_without_a_device(position):
    """Training with labels: the last layer and the head run at the masked positions only (sized from the labels)."""
    model = RoFormerForMaskedLM(config(position)).train()
    ids = torch.randint(5, 101, (2, 16))
    labels = torch.where(torch.rand(2, 16) < 0.3, ids, -100)
    labels[0, 3] = ids[0, 3]  # at least one masked position
    with HostTensorCheck():
        out = model(ids, attention_mask=torch.ones_like(ids), labels=labels)
        out.loss.backward()
    assert out.logits.shape[0] == int(labels.ne(-100).sum())
