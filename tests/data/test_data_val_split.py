"""The validation split held out of each client's local train split (``data.val_fraction``)."""

from __future__ import annotations

import numpy as np
import pytest
from ml_collections import ConfigDict

from spry_jax.data import DataError, make_federated_data

# The fingerprint of this data before validation splits existed: with val_fraction 0 it must
# not change, or every checkpoint written before would be refused on resume.
FINGERPRINT_BEFORE = "84cca3138c0166d570e7cd69aa3c1b24e5defabd5689a50fa44bae01d31aa618"


def _cfg(**kw) -> ConfigDict:
    base = dict(
        name="synthetic",
        vocab_size=128,
        num_examples=320,
        num_labels=2,
        seq_len=16,
        max_length=16,
        alpha=1.0,
        partition="dirichlet",
    )
    base.update(kw)
    return ConfigDict(base)


def _fed(**kw):
    return make_federated_data(_cfg(**kw), num_clients=8, tokenizer=None, seed=0)


def test_val_fraction_zero_changes_nothing():
    plain = _fed()
    zero = _fed(val_fraction=0.0)
    assert plain.fingerprint == zero.fingerprint == FINGERPRINT_BEFORE
    for c in range(8):
        for k in plain.train[c]:
            np.testing.assert_array_equal(plain.train[c][k], zero.train[c][k])
            np.testing.assert_array_equal(plain.test[c][k], zero.test[c][k])
        assert zero.num_val_examples(c) == 0 and set(zero.val[c]) == set(zero.train[c])


def test_val_is_drawn_from_train_only_disjoint_and_deterministic():
    plain = _fed()
    fd = _fed(val_fraction=0.25)
    again = _fed(val_fraction=0.25)
    assert fd.fingerprint != plain.fingerprint
    assert fd.fingerprint == again.fingerprint
    labels = fd.dataset.labels
    for c in range(8):
        tr, te = fd.client_examples[c]
        va = fd.val_examples[c]
        tr0, te0 = plain.client_examples[c]
        # Test is untouched; val and the new train partition the old train, train in order.
        np.testing.assert_array_equal(te, te0)
        assert not set(va) & set(tr) and not set(va) & set(te) and not set(tr) & set(te)
        assert sorted(np.r_[tr, va].tolist()) == sorted(tr0.tolist())
        np.testing.assert_array_equal(tr, tr0[np.isin(tr0, tr)])
        assert len(va) == int(np.floor(0.25 * len(tr0)))
        np.testing.assert_array_equal(va, again.val_examples[c])
        np.testing.assert_array_equal(fd.val[c]["labels"], labels[va])
        np.testing.assert_array_equal(fd.train[c]["labels"], labels[tr])
        assert fd.num_examples(c) == len(tr) and fd.num_val_examples(c) == len(va)
    # Another seed draws other validation examples.
    other = make_federated_data(_cfg(val_fraction=0.25), num_clients=8, tokenizer=None, seed=1)
    assert other.fingerprint != fd.fingerprint


@pytest.mark.parametrize("bad", [-0.1, 1.0])
def test_val_fraction_out_of_range_is_refused(bad):
    with pytest.raises(DataError, match="data.val_fraction"):
        _fed(val_fraction=bad)


def test_val_fraction_too_small_for_every_client_is_refused():
    with pytest.raises(DataError, match="validation split empty"):
        _fed(val_fraction=0.01)
