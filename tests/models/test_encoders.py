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

from spry_jax import models
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
