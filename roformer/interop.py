"""Weights to and from transformers' RoFormer* and Bert* models, through one explicit key map.

BERT maps to `position="learned"` (and a tanh classification head, its pooler); RoFormer to
`position="rotary"` with interleaved pairing. Every tensor is copied by name with a shape check, and
every weight on both sides must be accounted for, so a mismatch fails loudly instead of half-loading.
"""

from __future__ import annotations

import torch

from roformer.config import ModelConfig
from roformer.errors import InteropError
from roformer.modeling import RoFormerForMaskedLM, RoFormerForSequenceClassification, RoFormerModel
from roformer.positions import POSITION_SCHEMES, scheme_class

# transformers class name -> (family, our class)
HF_CLASSES = {
    "RoFormerModel": ("roformer", RoFormerModel),
    "RoFormerForMaskedLM": ("roformer", RoFormerForMaskedLM),
    "RoFormerForSequenceClassification": ("roformer", RoFormerForSequenceClassification),
    "BertModel": ("bert", RoFormerModel),
    "BertForMaskedLM": ("bert", RoFormerForMaskedLM),
    "BertForSequenceClassification": ("bert", RoFormerForSequenceClassification),
}
# the scheme each transformers family maps to, from the schemes' own facts: rotary <-> roformer, learned <-> bert
POSITION_OF_FAMILY = {c.transformers_family: name for name, c in POSITION_SCHEMES.items() if c.transformers_family}


def _encoder_keys(cfg: ModelConfig, ours: str, theirs: str, family: str) -> list[tuple[str, str]]:
    pairs = [
        (f"{ours}embeddings.word_embeddings.weight", f"{theirs}embeddings.word_embeddings.weight"),
        (f"{ours}embeddings.token_type_embeddings.weight", f"{theirs}embeddings.token_type_embeddings.weight"),
        (f"{ours}embeddings.norm.weight", f"{theirs}embeddings.LayerNorm.weight"),
        (f"{ours}embeddings.norm.bias", f"{theirs}embeddings.LayerNorm.bias"),
    ]
    if family == "bert":
        pairs.append(
            (f"{ours}embeddings.positions.position_embeddings.weight", f"{theirs}embeddings.position_embeddings.weight")
        )
    if cfg.embedding_dim != cfg.hidden_size:
        pairs += [(f"{ours}embeddings_project.{p}", f"{theirs}embeddings_project.{p}") for p in ("weight", "bias")]
    layer_parts = {
        "attn.query": "attention.self.query",
        "attn.key": "attention.self.key",
        "attn.value": "attention.self.value",
        "attn.out": "attention.output.dense",
        "attn_norm": "attention.output.LayerNorm",
        "ffn.up": "intermediate.dense",
        "ffn.down": "output.dense",
        "ffn_norm": "output.LayerNorm",
    }
    for i in range(cfg.num_layers):
        for mine, hf in layer_parts.items():
            for p in ("weight", "bias"):
                pairs.append((f"{ours}encoder.layers.{i}.{mine}.{p}", f"{theirs}encoder.layer.{i}.{hf}.{p}"))
    return pairs


def key_map(cfg: ModelConfig, our_class: type, family: str) -> list[tuple[str, str]]:
    """(our key, transformers key) for every weight of `our_class` in the `family` ('roformer' or 'bert')."""
    if our_class is RoFormerModel:
        return _encoder_keys(cfg, "", "", family)
    pairs = _encoder_keys(cfg, "roformer.", f"{family}.", family)
    if our_class is RoFormerForMaskedLM:
        head = {"head.dense": "cls.predictions.transform.dense", "head.norm": "cls.predictions.transform.LayerNorm"}
        pairs += [(f"{m}.{p}", f"{h}.{p}") for m, h in head.items() for p in ("weight", "bias")]
        pairs += [
            ("head.decoder.weight", "cls.predictions.decoder.weight"),
            ("head.decoder.bias", "cls.predictions.decoder.bias"),
        ]
    elif our_class is RoFormerForSequenceClassification:
        head = {"classifier.dense": "classifier.dense", "classifier.out_proj": "classifier.out_proj"}
        if family == "bert":
            head = {"classifier.dense": "bert.pooler.dense", "classifier.out_proj": "classifier"}
        pairs += [(f"{m}.{p}", f"{h}.{p}") for m, h in head.items() for p in ("weight", "bias")]
    return pairs


def _copy(dst: dict[str, torch.Tensor], src: dict[str, torch.Tensor], pairs, src_side: int, what: str) -> None:
    for pair in pairs:
        src_key, dst_key = pair[src_side], pair[1 - src_side]
        if src_key not in src:
            raise InteropError(f"{what}: weight {src_key!r} is missing")
        if dst[dst_key].shape != src[src_key].shape:
            raise InteropError(
                f"{what}: {src_key!r} has shape {tuple(src[src_key].shape)}, "
                f"{dst_key!r} needs {tuple(dst[dst_key].shape)}"
            )
        dst[dst_key].copy_(src[src_key])


def _config_from_hf(hf_config, family: str) -> ModelConfig:
    common = dict(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        intermediate_size=hf_config.intermediate_size,
        max_position_embeddings=hf_config.max_position_embeddings,
        type_vocab_size=hf_config.type_vocab_size,
        hidden_act=hf_config.hidden_act,
        hidden_dropout=hf_config.hidden_dropout_prob,
        attention_dropout=hf_config.attention_probs_dropout_prob,
        layer_norm_eps=hf_config.layer_norm_eps,
        initializer_range=hf_config.initializer_range,
        pad_token_id=hf_config.pad_token_id if hf_config.pad_token_id is not None else 0,
    )
    if family == "bert":
        if getattr(hf_config, "position_embedding_type", "absolute") != "absolute":
            raise InteropError(
                f"BERT with position_embedding_type={hf_config.position_embedding_type!r} "
                "has no equivalent here; only 'absolute' maps to position=learned"
            )
        return ModelConfig(**common, position=POSITION_OF_FAMILY["bert"], classifier_activation="tanh")
    return ModelConfig(
        **common,
        position=POSITION_OF_FAMILY["roformer"],
        rotary_pairing="interleaved",
        embedding_size=hf_config.embedding_size,
        rotary_value=hf_config.rotary_value,
        classifier_activation=hf_config.hidden_act,
    )


def from_transformers(hf_model) -> RoFormerModel | RoFormerForMaskedLM | RoFormerForSequenceClassification:
    """A transformers RoFormer*/Bert* model -> the matching model here, with the same outputs."""
    name = type(hf_model).__name__
    if name not in HF_CLASSES:
        raise InteropError(f"cannot convert a {name}; supported: {', '.join(HF_CLASSES)}")
    family, our_class = HF_CLASSES[name]
    cfg = _config_from_hf(hf_model.config, family)
    model = (
        our_class(cfg, num_labels=hf_model.config.num_labels)
        if our_class is RoFormerForSequenceClassification
        else our_class(cfg)
    )
    ours = model.state_dict()
    with torch.no_grad():
        _copy(ours, hf_model.state_dict(), key_map(cfg, our_class, family), src_side=1, what=name)
    return model.train(hf_model.training)


def _hf_config(model, family: str):
    import transformers

    cfg = model.config
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=cfg.type_vocab_size,
        hidden_act=cfg.hidden_act,
        hidden_dropout_prob=cfg.hidden_dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        layer_norm_eps=cfg.layer_norm_eps,
        initializer_range=cfg.initializer_range,
        pad_token_id=cfg.pad_token_id,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    if isinstance(model, RoFormerForSequenceClassification):
        common["num_labels"] = model.num_labels
        common["problem_type"] = "regression" if model.num_labels == 1 else "single_label_classification"
    if family == "bert":
        return transformers.BertConfig(**common)
    return transformers.RoFormerConfig(**common, embedding_size=cfg.embedding_dim, rotary_value=cfg.rotary_value)


def _check_representable(model, family: str | None) -> None:
    cfg = model.config
    problems = scheme_class(cfg.position).transformers_problems(cfg)  # the scheme knows what it cannot carry over
    if cfg.attention != "softmax":
        problems.append("transformers' models have softmax attention only")
    if family == "bert" and cfg.embedding_dim != cfg.hidden_size:
        problems.append("BERT has no embedding_size distinct from hidden_size")
    if isinstance(model, RoFormerForSequenceClassification):
        wanted = "tanh" if family == "bert" else cfg.hidden_act
        if cfg.classifier_activation != wanted:
            problems.append(f"the {family} classification head uses {wanted}, this model {cfg.classifier_activation}")
    if problems:
        raise InteropError("cannot convert to transformers: " + "; ".join(problems))


def to_transformers(model):
    """A model here -> transformers (rotary -> RoFormer*, learned -> Bert*), with the same outputs."""
    import transformers

    family = scheme_class(model.config.position).transformers_family
    _check_representable(model, family)
    prefix = "RoFormer" if family == "roformer" else "Bert"
    suffix = {
        RoFormerModel: "Model",
        RoFormerForMaskedLM: "ForMaskedLM",
        RoFormerForSequenceClassification: "ForSequenceClassification",
    }.get(type(model))
    if suffix is None:
        raise InteropError(f"cannot convert a {type(model).__name__} to transformers")
    hf_class = getattr(transformers, prefix + suffix)
    hf_config = _hf_config(model, family)
    hf_model = (
        hf_class(hf_config, add_pooling_layer=False) if hf_class is transformers.BertModel else hf_class(hf_config)
    )
    theirs = hf_model.state_dict()
    with torch.no_grad():
        _copy(
            theirs,
            model.state_dict(),
            key_map(model.config, type(model), family),
            src_side=0,
            what=type(model).__name__,
        )
    return hf_model.train(model.training)
