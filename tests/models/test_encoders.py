"""Parity of the encoders with transformers' PyTorch implementations of the same checkpoints.

Each family: a tiny random model built with transformers' own class (weights re-drawn at a
scale where errors would show), ``save_pretrained``, loaded with ``from_pretrained``; logits on
a padded batch must equal PyTorch's within 1e-4 (float32).
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from spry_jax import evaluation, models, tasks
from spry_jax.models import peft

VOCAB = 99

CONFIGS = {
    "bert": lambda: transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
    ),
    "roberta": lambda: transformers.RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=70,
        type_vocab_size=1,
        pad_token_id=1,
    ),
    "distilbert": lambda: transformers.DistilBertConfig(
        vocab_size=VOCAB,
        dim=32,
        n_layers=2,
        n_heads=4,
        hidden_dim=37,
        max_position_embeddings=64,
    ),
    "albert": lambda: transformers.AlbertConfig(
        vocab_size=VOCAB,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
    ),
    # Two groups of two inner layers applied over four layers: group sharing and inner lists.
    "albert-groups": lambda: transformers.AlbertConfig(
        vocab_size=VOCAB,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=4,
        num_hidden_groups=2,
        inner_group_num=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        hidden_act="gelu",
    ),
}
TORCH_CLASSES = {
    "classification": transformers.AutoModelForSequenceClassification,
    "qa": transformers.AutoModelForQuestionAnswering,
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Re-draws every parameter at O(0.1-1) scale so that a wrong op changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            p.copy_(
                1.0 + noise
                if name.endswith("LayerNorm.weight") or "layer_norm.weight" in name
                else noise
            )


def _batch(pad_id: int, seed: int = 0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, VOCAB, size=(3, 11))
    mask = np.ones_like(ids)
    for row, length in ((1, 7), (2, 4)):
        ids[row, length:] = pad_id
        mask[row, length:] = 0
    return ids, mask


def _torch_logits(tm, ids, mask, task):
    with torch.no_grad():
        out = tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if task == "qa":
        return np.stack([out.start_logits.numpy(), out.end_logits.numpy()], axis=-1)
    return out.logits.numpy()


def _save_torch(family, task, tmp_path, num_labels=3, seed=0):
    config = CONFIGS[family]()
    config.num_labels = 2 if task == "qa" else num_labels
    torch.manual_seed(seed)
    tm = TORCH_CLASSES[task].from_config(config).eval()
    _randomize(tm, seed)
    tm.save_pretrained(tmp_path)
    return tm, config


@pytest.mark.parametrize("task", ["classification", "qa"])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_parity_float32(family, task, tmp_path):
    tm, config = _save_torch(family, task, tmp_path)
    model = models.from_pretrained(tmp_path, task=task, num_labels=3)
    ids, mask = _batch(config.pad_token_id)
    ref = _torch_logits(tm, ids, mask, task)
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    assert got.shape == ref.shape
    assert np.abs(ref).max() > 0.1  # the comparison is not between near-zero numbers
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_albert_shares_layer_weights(tmp_path):
    _save_torch("albert", "classification", tmp_path)
    model = models.from_pretrained(tmp_path, num_labels=3)
    assert len(model.encoder.albert_layer_groups) == 1
    model = models.apply_peft(model, {"method": "lora"})
    # One shared layer: LoRA A/B on its query and value, then the head -> 3 units of 2 tensors.
    order = peft.trainable_paths(model, {"method": "lora"})
    assert len(order) == 6 and order[-2:] == ("classifier/kernel", "classifier/bias")


def test_bfloat16_close_to_float32(tmp_path):
    tm, config = _save_torch("bert", "classification", tmp_path)
    ids, mask = _batch(config.pad_token_id)
    f32 = np.asarray(models.from_pretrained(tmp_path, num_labels=3)(ids, mask))
    m16 = models.from_pretrained(tmp_path, num_labels=3, dtype="bfloat16")
    assert m16.encoder.layer[0].attention.self.query.kernel[...].dtype == jnp.bfloat16
    bf16 = np.asarray(m16(ids, mask))
    assert bf16.dtype == np.float32
    # bfloat16 keeps 8 mantissa bits: ~1e-2 relative error through two layers.
    np.testing.assert_allclose(bf16, f32, atol=0.1 * np.abs(f32).max())
    assert not np.allclose(bf16, f32, atol=1e-6)


def test_roberta_left_padding_positions(tmp_path):
    """RoBERTa counts positions over non-pad tokens, so left padding must not shift them."""
    tm, config = _save_torch("roberta", "classification", tmp_path)
    model = models.from_pretrained(tmp_path, num_labels=3)
    ids = np.array([[5, 6, 7, 8, 9], [1, 1, 6, 7, 8]])
    mask = (ids != 1).astype(np.int64)
    np.testing.assert_allclose(
        np.asarray(model(ids, mask)), _torch_logits(tm, ids, mask, "classification"), atol=1e-4
    )


def test_distilbert_sinusoidal_random_init_matches_transformers():
    config = transformers.DistilBertConfig(
        vocab_size=VOCAB,
        dim=32,
        n_layers=1,
        n_heads=4,
        hidden_dim=37,
        max_position_embeddings=16,
        sinusoidal_pos_embds=True,
    )
    tm = transformers.DistilBertModel(config)
    ours = models.build_model(config)
    np.testing.assert_allclose(
        np.asarray(ours.embeddings.position_embeddings.embedding[...]),
        tm.embeddings.position_embeddings.weight.detach().numpy(),
        atol=1e-6,
    )


@pytest.mark.parametrize("name", ["roberta-large", "bert-large", "distilbert-base", "albert-large"])
def test_paper_encoders_build_without_hub_and_match_parameter_count(name):
    """abstract_model builds the paper's encoders from registry hyper-parameters alone; the
    parameter count equals transformers' (built on the meta device, no memory)."""
    model = models.abstract_model(name, num_labels=4)
    ours = sum(int(np.prod(v.shape)) for _, v in peft.iter_variables(model))
    config = models.load_config(name, prefer_registry=True)
    config.num_labels = 4
    with torch.device("meta"):
        tm = transformers.AutoModelForSequenceClassification.from_config(config)
    assert ours == sum(p.numel() for p in tm.parameters())


def test_causal_lm_refused_for_encoders(tmp_path):
    _save_torch("bert", "classification", tmp_path)
    with pytest.raises(ValueError, match="causal_lm"):
        models.from_pretrained(tmp_path, task="causal_lm")


# --------------------------------------------------------------------------------------------
# Sentence pairs (issue 11, item 6): segment ids reach BERT and ALBERT through every boundary.
# --------------------------------------------------------------------------------------------


def _pair_batch(pad_id: int, seed: int = 1):
    """Three right-padded pairs ``[CLS] a [SEP] b [SEP]``: segment 1 on ``b``, 0 on padding."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, VOCAB, size=(3, 12))
    mask = np.ones_like(ids)
    types = np.zeros_like(ids)
    for row, (second, length) in enumerate(((5, 12), (3, 9), (2, 6))):
        types[row, second:length] = 1
        ids[row, length:] = pad_id
        mask[row, length:] = 0
    return ids, mask, types


@pytest.mark.parametrize("task", ["classification", "qa"])
@pytest.mark.parametrize("family", ["bert", "albert"])
def test_sentence_pair_parity_with_token_type_ids(family, task, tmp_path):
    tm, config = _save_torch(family, task, tmp_path)
    model = models.from_pretrained(tmp_path, task=task, num_labels=3)
    assert model.uses_token_types
    ids, mask, types = _pair_batch(config.pad_token_id)
    with torch.no_grad():
        out = tm(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(types),
        )
    ref = (
        np.stack([out.start_logits.numpy(), out.end_logits.numpy()], -1)
        if task == "qa"
        else out.logits.numpy()
    )
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types)))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    # Segments matter at this scale: dropping them moves the logits far past the tolerance.
    assert np.abs(np.asarray(model(ids, mask)) - ref).max() > 1e-2
    # The same logits through the SplitModel boundary, and the loss and eval built on it.
    split = peft.split_model(model, {"method": "head"})
    via_split = split.apply_fn(split.trainable, split.frozen, ids, mask, None, token_type_ids=types)
    np.testing.assert_allclose(np.asarray(via_split), ref, atol=1e-4, rtol=1e-4)
    if task == "classification":
        labels = np.array([0, 2, 1])
        batch = {
            "input_ids": jnp.asarray(ids),
            "attention_mask": jnp.asarray(mask),
            "token_type_ids": jnp.asarray(types),
            "labels": jnp.asarray(labels),
            "example_mask": jnp.ones(3),
        }
        loss = tasks.make_loss_fn(split)(split.trainable, split.frozen, batch, None)
        ref_loss = torch.nn.functional.cross_entropy(torch.tensor(ref), torch.tensor(labels))
        np.testing.assert_allclose(float(loss), float(ref_loss), atol=1e-5)
        ev = evaluation.classification_batch_sums(split)(split.trainable, split.frozen, batch)
        assert float(ev["correct"]) == float((ref.argmax(-1) == labels).sum())


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_single_segment_encoders_ignore_token_type_ids_at_the_boundary(family, tmp_path):
    """RoBERTa (one segment type) and DistilBERT (none) never see segment ids from a batch;
    DistilBERT's module refuses them outright, as transformers' does."""
    tm, config = _save_torch(family, "classification", tmp_path)
    model = models.from_pretrained(tmp_path, num_labels=3)
    assert not model.uses_token_types
    ids, mask, types = _pair_batch(config.pad_token_id)
    ref = _torch_logits(tm, ids, mask, "classification")
    split = peft.split_model(model, {"method": "head"})
    got = split.apply_fn(split.trainable, split.frozen, ids, mask, None, token_type_ids=types)
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4, rtol=1e-4)
    if family == "distilbert":
        with pytest.raises(ValueError, match="no token type embeddings"):
            model(ids, mask, types)
    else:
        np.testing.assert_allclose(
            np.asarray(model(ids, mask, np.zeros_like(types))), ref, atol=1e-4, rtol=1e-4
        )
