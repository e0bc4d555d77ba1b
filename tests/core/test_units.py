"""Units (how trainable tensors are grouped per PEFT method) and their assignment to clients."""

import jax
import numpy as np
import pytest

from experiments import smoke
from spry_jax import models, train
from spry_jax.core import units as U

ORDER = tuple(f"layer{i}/lora_{ab}" for i in range(5) for ab in "ab") + ("head/kernel", "head/bias")
HEAD = ("head/kernel", "head/bias")


def _assignment(m, g, seed=0, slots=None):
    return np.asarray(U.assign_units(jax.random.PRNGKey(seed), m, g, slots))


def test_make_units_groups_consecutive_pairs_head_last():
    units = U.make_units(ORDER, 2, HEAD, peft_method="lora")
    assert units.num_units == 6
    assert units.unit_members(0) == ("layer0/lora_a", "layer0/lora_b")
    assert units.unit_members(5) == HEAD


def test_classifier_share_removes_head_from_units_and_gives_it_to_everyone():
    units = U.make_units(ORDER, 2, HEAD, classifier_share=True, peft_method="lora")
    assert units.num_units == 5
    masks = U.unit_masks(units, U.assign_units(jax.random.PRNGKey(1), 3, 5, num_slots=4))
    np.testing.assert_array_equal(masks["head/kernel"], [1, 1, 1, 0])


def test_lora_units_stay_inside_one_module():
    # One tensor per unit splits a module's (A, B) but never joins two modules; the head
    # stays one unit whatever the chunk size.
    units = U.make_units(ORDER, 1, HEAD, peft_method="lora")
    assert units.members() == tuple((k,) for k in ORDER[:-2]) + (HEAD,)
    # 5 tensors would be 2.5 modules per unit (the release chunks across modules): refused.
    with pytest.raises(ValueError, match="tensors_per_unit=5.*several LoRA modules"):
        U.make_units(ORDER, 5, HEAD, peft_method="lora")


@pytest.mark.parametrize("m,g", [(3, 7), (7, 7), (10, 4), (9, 3), (1, 5), (5, 1)])
def test_every_unit_trained_and_share_counts(m, g):
    a = _assignment(m, g, seed=m * 31 + g)
    assert a.shape == (m, g)
    shares = a.sum(0)
    assert (shares >= 1).all(), "a unit was left untrained"
    assert set(shares.tolist()) <= {m // g, -(-m // g)} | ({1} if m <= g else set())
    if m <= g:
        assert (shares == 1).all()
        # Each client gets floor(G/M) or ceil(G/M) units.
        assert set(a.sum(1).tolist()) <= {g // m, -(-g // m)}
    else:
        assert (a.sum(1) == 1).all()
        assert set(shares.tolist()) <= {m // g, -(-m // g)}


def test_assignment_is_deterministic_and_shuffled_per_key():
    a0, a0b = _assignment(10, 10, seed=3), _assignment(10, 10, seed=3)
    np.testing.assert_array_equal(a0, a0b)
    others = [_assignment(10, 10, seed=s) for s in range(4, 10)]
    assert any((o != a0).any() for o in others), "slot order never changes with the key"


def test_padded_slots_get_nothing():
    a = _assignment(3, 6, slots=8)
    assert a.shape == (8, 6)
    assert a[3:].sum() == 0


def test_full_masks_cover_real_clients_only():
    units = U.make_units(ORDER, 2, HEAD, peft_method="lora")
    masks = U.full_masks(units, 3, 4)
    for k in ORDER:
        np.testing.assert_array_equal(masks[k], [1, 1, 1, 0])


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="tensors_per_unit"):
        U.make_units(ORDER, 0, HEAD, peft_method="lora")
    with pytest.raises(ValueError, match="head_keys"):
        U.make_units(ORDER, 2, ("nope",), peft_method="lora")
    with pytest.raises(ValueError, match="peft.method"):
        U.make_units(ORDER, 2, HEAD, peft_method="prefix")
    with pytest.raises(ValueError, match="clients_per_round"):
        U.slot_table(0, 3)


# --------------------------------------------------------------------------------------------
# Units of the real encoder families, per PEFT method (issue 11, item 3): BitFit and IA3 deal
# one tensor per unit, LoRA one module's (A, B), and the head is one unit of its own.
# --------------------------------------------------------------------------------------------

FAMILIES = {
    "bert": ("tiny-bert", {}),
    "distilbert": (
        "distilbert-base",
        dict(n_layers=2, dim=32, n_heads=4, hidden_dim=64, vocab_size=128),
    ),
    "roberta": (
        "roberta-large",
        dict(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=128,
            max_position_embeddings=70,
        ),
    ),
}
HEADS = {
    "bert": ("classifier/kernel", "classifier/bias"),
    "distilbert": (
        "pre_classifier/kernel",
        "pre_classifier/bias",
        "classifier/kernel",
        "classifier/bias",
    ),
    "roberta": (
        "classifier/dense/kernel",
        "classifier/dense/bias",
        "classifier/out_proj/kernel",
        "classifier/out_proj/bias",
    ),
}
# Per layer, in model order: LoRA on query/value, IA3 on key/value/FFN-out, BitFit biases.
BERT_LAYER = {
    "lora": ["attention/self/query", "attention/self/value"],
    "ia3": ["attention/self/key/ia3", "attention/self/value/ia3", "output/dense/ia3"],
    "bitfit": [
        "attention/self/query/bias",
        "attention/self/key/bias",
        "attention/self/value/bias",
        "attention/output/dense/bias",
        "attention/output/LayerNorm/bias",
        "intermediate/dense/bias",
        "output/dense/bias",
        "output/LayerNorm/bias",
    ],
}
DISTILBERT_LAYER = {
    "lora": ["attention/q_lin", "attention/v_lin"],
    "ia3": ["attention/k_lin/ia3", "attention/v_lin/ia3", "ffn/lin2/ia3"],
    "bitfit": [
        "attention/q_lin/bias",
        "attention/k_lin/bias",
        "attention/v_lin/bias",
        "attention/out_lin/bias",
        "sa_layer_norm/bias",
        "ffn/lin1/bias",
        "ffn/lin2/bias",
        "output_layer_norm/bias",
    ],
}


def _expected_units(family: str, method: str) -> list[tuple[str, ...]]:
    """The units written out: unit g -> its tensor keys, head last."""
    prefix, layer = (
        ("transformer/layer", DISTILBERT_LAYER)
        if family == "distilbert"
        else ("encoder/layer", BERT_LAYER)
    )
    units: list[tuple[str, ...]] = []
    if method == "bitfit":
        units.append(("embeddings/LayerNorm/bias",))
    for i in range(2):
        for name in layer.get(method, []):
            path = f"{prefix}/{i}/{name}"
            units.append((f"{path}/lora_a", f"{path}/lora_b") if method == "lora" else (path,))
    if method == "bitfit" and family == "bert":
        units.append(("pooler/dense/bias",))  # BERT's pooler is pretrained body, not head
    units.append(HEADS[family])
    return units


def _split_model(family: str, method: str):
    name, overrides = FAMILIES[family]
    return models.make_split_model(
        dict(name=name, pretrained=False, overrides=overrides, dropout=0.0),
        dict(method=method, lora_rank=1),
        num_labels=3,
    )


@pytest.mark.parametrize("method", ["lora", "ia3", "bitfit", "head"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_units_per_peft_method_on_encoders(family, method):
    model = _split_model(family, method)
    assert model.peft_method == method
    assert model.head_keys == HEADS[family]
    expected = _expected_units(family, method)
    # tensors_per_unit is LoRA's chunk size: 2 (the default) and 4 deal IA3/BitFit alike.
    for tensors_per_unit in (2,) if method == "lora" else (2, 4):
        units = U.make_units(
            model.order, tensors_per_unit, model.head_keys, peft_method=model.peft_method
        )
        assert [list(u) for u in units.members()] == [list(u) for u in expected]
        # The rules, stated once more: the head is the last unit and holds nothing else; every
        # other unit is one tensor (IA3/BitFit) or one module's (A, B) (LoRA).
        assert units.members()[-1] == model.head_keys
        for unit in units.members()[:-1]:
            assert not set(unit) & set(model.head_keys)
            if method == "lora":
                modules = {k.rsplit("/", 1)[0] for k in unit}
                assert len(modules) == 1 and [k.rsplit("/", 1)[1] for k in unit] == [
                    "lora_a",
                    "lora_b",
                ]
            else:
                assert len(unit) == 1
        assert sorted(k for u in units.members() for k in u) == sorted(model.order)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_classifier_share_keeps_every_head_tensor_out_of_the_units(family):
    model = _split_model(family, "bitfit")
    units = U.make_units(model.order, 2, model.head_keys, True, peft_method="bitfit")
    assert units.members() == tuple(_expected_units(family, "bitfit")[:-1])
    assert all(units.unit_of_key[k] == -1 for k in HEADS[family])


def test_lora_one_tensor_per_unit_keeps_the_head_whole():
    model = _split_model("distilbert", "lora")
    units = U.make_units(model.order, 1, model.head_keys, peft_method="lora")
    lora = [k for k in model.order if k not in model.head_keys]
    assert units.members() == tuple((k,) for k in lora) + (HEADS["distilbert"],)


@pytest.mark.parametrize("method", ["ia3", "bitfit"])
def test_build_experiment_deals_units_by_the_peft_method(method):
    """The method reaches make_units from a config (train.build_experiment)."""
    cfg = smoke.get_config()
    cfg.round.backend = "vmap"
    cfg.peft.method = method
    exp = train.build_experiment(cfg)
    members = exp.spec.units.members()
    assert members[-1] == exp.model.head_keys == ("classifier/kernel", "classifier/bias")
    assert all(len(u) == 1 for u in members[:-1])
    assert len(members) == len(exp.model.order) - 1
