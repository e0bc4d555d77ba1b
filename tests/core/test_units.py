import jax
import numpy as np
import pytest

from spry_jax.core import units as U

ORDER = tuple(f"layer{i}/lora_{ab}" for i in range(5) for ab in "ab") + ("head/kernel", "head/bias")
HEAD = ("head/kernel", "head/bias")


def _assignment(m, g, seed=0, slots=None):
    return np.asarray(U.assign_units(jax.random.PRNGKey(seed), m, g, slots))


def test_make_units_groups_consecutive_pairs_head_last():
    units = U.make_units(ORDER, 2, HEAD)
    assert units.num_units == 6
    assert units.unit_members(0) == ("layer0/lora_a", "layer0/lora_b")
    assert units.unit_members(5) == HEAD


def test_classifier_share_removes_head_from_units_and_gives_it_to_everyone():
    units = U.make_units(ORDER, 2, HEAD, classifier_share=True)
    assert units.num_units == 5
    masks = U.unit_masks(units, U.assign_units(jax.random.PRNGKey(1), 3, 5, num_slots=4))
    np.testing.assert_array_equal(masks["head/kernel"], [1, 1, 1, 0])


def test_odd_unit_size_leaves_a_short_last_unit():
    units = U.make_units(ORDER, 5, HEAD)
    assert units.num_units == 3
    assert units.unit_members(2) == ("head/kernel", "head/bias")


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
    units = U.make_units(ORDER, 2, HEAD)
    masks = U.full_masks(units, 3, 4)
    for k in ORDER:
        np.testing.assert_array_equal(masks[k], [1, 1, 1, 0])


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="tensors_per_unit"):
        U.make_units(ORDER, 0, HEAD)
    with pytest.raises(ValueError, match="head_keys"):
        U.make_units(ORDER, 2, ("nope",))
    with pytest.raises(ValueError, match="clients_per_round"):
        U.slot_table(0, 3)
