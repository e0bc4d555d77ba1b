"""The client update: skipped leaves really skip (weights and optimizer state), per-leaf Adam
step counts, and the split-half variance FwdLLM+'s server filter reads."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spry_jax import tasks
from spry_jax.core import client as C
from spry_jax.core import estimators as E
from spry_jax.core import zero_order as Z
from tests.core.toy import make_toy_batches, make_toy_model

STEPS, BATCH, LR, WD = 3, 4, 1e-2, 0.01
SHAPES = {"layer/0/w": (4, 3), "layer/1/w": (3, 3), "head/w": (3, 2)}


def _layered():
    """Two layers and a head whose keys carry a layer index, so LCSB has two blocks:
    {layer 0, head} and {layer 1, head}."""
    rng = np.random.default_rng(0)
    params = {k: jnp.asarray(rng.normal(size=s) * 0.5, jnp.float32) for k, s in SHAPES.items()}
    batches = {
        "x": jnp.asarray(rng.normal(size=(STEPS, BATCH, 4)), jnp.float32),
        "y": jnp.asarray(rng.normal(size=(STEPS, BATCH, 2)), jnp.float32),
        "example_mask": jnp.ones((STEPS, BATCH), jnp.float32),
    }

    def loss_fn(tr, frozen, batch, rng_key):
        del frozen, rng_key
        h = jnp.tanh(batch["x"] @ tr["layer/0/w"])
        h = jnp.tanh(h @ tr["layer/1/w"])
        return jnp.mean((h @ tr["head/w"] - batch["y"]) ** 2)

    return params, batches, loss_fn


def _prefix(n):
    return jnp.asarray([1.0] * n + [0.0] * (STEPS - n))


def _same(a, b):
    """Bit-identical pytrees (same structure, same values)."""
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(map(np.array_equal, jax.tree.leaves(a), jax.tree.leaves(b)))


def _count(state):
    return int(optax.tree_utils.tree_get(state, "count"))


def test_lcsb_leaves_outside_the_block_keep_weights_and_optimizer_state():
    params, batches, loss_fn = _layered()
    opt = C.make_client_optimizer("adamw", LR, weight_decay=WD)
    ones = {k: jnp.float32(1.0) for k in params}
    key = jax.random.PRNGKey(0)
    # Step 0 trains block 0 (layer 0 + head), step 1 block 1 (layer 1 + head), step 2 block 0.
    update = jax.jit(C.make_client_update(loss_fn, E.lcsb(1), opt))
    d1, d2, d3 = (update(params, None, ones, batches, _prefix(n), key).delta for n in (1, 2, 3))
    np.testing.assert_array_equal(d2["layer/0/w"], d1["layer/0/w"])  # skipped at step 1
    np.testing.assert_array_equal(d1["layer/1/w"], np.zeros(SHAPES["layer/1/w"]))
    np.testing.assert_array_equal(d3["layer/1/w"], d2["layer/1/w"])  # skipped at step 2
    for d in (d1, d2, d3):
        assert np.any(np.asarray(d["head/w"]) != 0)
    assert np.any(np.asarray(d2["layer/1/w"]) != 0) and np.any(np.asarray(d3["layer/0/w"]) != 0)

    train = jax.jit(C.make_local_train(loss_fn, E.lcsb(1), opt))
    o1, o2, o3 = (train(params, None, ones, batches, _prefix(n), key) for n in (1, 2, 3))
    init = C.init_leaf_states(opt, params)
    assert _same(o1.opt_state["layer/1/w"], init["layer/1/w"])
    assert _same(o2.opt_state["layer/0/w"], o1.opt_state["layer/0/w"])  # moments and count
    assert _same(o3.opt_state["layer/1/w"], o2.opt_state["layer/1/w"])
    assert not _same(o2.opt_state["head/w"], o1.opt_state["head/w"])
    # Per-leaf step counts, as PyTorch's per-parameter state["step"].
    assert {k: _count(s) for k, s in o3.opt_state.items()} == {
        "layer/0/w": 2,
        "layer/1/w": 1,
        "head/w": 3,
    }

    # Hand check: layer 1's first step (local step 1) is a fresh AdamW's first step on its
    # gradient at the weights after step 0 -- bias correction of step 1, not of step 2.
    batch1 = {k: v[1] for k, v in batches.items()}
    g = jax.grad(lambda w: loss_fn({**o1.params, "layer/1/w": w}, None, batch1, None))(
        o1.params["layer/1/w"]
    )
    leaf = optax.adamw(LR, weight_decay=WD)
    u, _ = leaf.update(g, leaf.init(o1.params["layer/1/w"]), o1.params["layer/1/w"])
    np.testing.assert_allclose(o2.params["layer/1/w"], o1.params["layer/1/w"] + u, rtol=1e-6)


def test_a_masked_leaf_has_no_optimizer_step():
    params, batches, loss_fn = _layered()
    opt = C.make_client_optimizer("adamw", LR, weight_decay=WD)
    mask = {k: jnp.float32(k != "head/w") for k in params}
    out = C.make_local_train(loss_fn, E.backprop(), opt)(
        params, None, mask, batches, _prefix(STEPS), jax.random.PRNGKey(0)
    )
    counts = {k: _count(s) for k, s in out.opt_state.items()}
    assert counts == {"layer/0/w": STEPS, "layer/1/w": STEPS, "head/w": 0}
    assert _same(out.opt_state["head/w"], opt.init(params["head/w"]))
    np.testing.assert_array_equal(out.params["head/w"], params["head/w"])


def test_fwdllm_step_filter_dropping_every_step_changes_nothing():
    model = make_toy_model()
    loss_fn = tasks.make_loss_fn(model)
    b = make_toy_batches(1, STEPS, BATCH, seed=1)
    batch = {k: v[0] for k, v in b.items() if k != "step_mask"}
    ones = {k: jnp.float32(1.0) for k in model.trainable}
    opt = C.make_client_optimizer("adamw", LR, weight_decay=WD)
    key, steps = jax.random.PRNGKey(2), jnp.ones(STEPS)
    args = (model.trainable, model.frozen, ones, batch, steps, key)
    # A relative variance is > 0 for any real estimate, so a threshold of 1e-12 drops them all.
    dropped = jax.jit(C.make_client_update(loss_fn, Z.fwdllm(6, 3, 1e-2, 1e-12), opt))(*args)
    kept = jax.jit(C.make_client_update(loss_fn, Z.fwdllm(6, 3, 1e-2, 1e9), opt))(*args)
    for k in model.trainable:
        np.testing.assert_array_equal(dropped.delta[k], np.zeros(model.trainable[k].shape))
        assert np.any(np.asarray(kept.delta[k]) != 0), k
    out = C.make_local_train(loss_fn, Z.fwdllm(6, 3, 1e-2, 1e-12), opt)(*args)
    assert _same(out.opt_state, C.init_leaf_states(opt, model.trainable))
    assert _same(out.params, model.trainable)


def test_leafwise_step_keeps_inactive_leaves_bit_identical():
    params = {"a": jnp.arange(3.0), "b": jnp.ones((2, 2))}
    grads = {"a": jnp.ones(3), "b": jnp.full((2, 2), 0.5)}
    opt = optax.adamw(0.1, weight_decay=0.1)
    states = C.init_leaf_states(opt, params)
    p, s = C.leafwise_step(opt, grads, states, params, {"a": True, "b": False})
    p, s = C.leafwise_step(opt, grads, s, p, {"a": True, "b": False})
    np.testing.assert_array_equal(p["b"], params["b"])
    assert _same(s["b"], states["b"]) and _count(s["a"]) == 2


def _table_estimator(table):
    """Returns ``table[k][step]`` as the step's estimate; step 3 is marked not estimated."""

    def estimate(f, params, mask, key, inputs):
        del key
        step = inputs.step
        grad = {k: jnp.asarray(v)[step] * mask[k] for k, v in table.items()}
        estimated = dict.fromkeys(params, step != 3)
        return E.Estimate(f(params), grad, jnp.zeros((0,), jnp.float32), estimated)

    return estimate


def test_split_half_variance_matches_numpy():
    params, _, loss_fn = _layered()
    steps = 7
    rng = np.random.default_rng(5)
    table = {k: rng.normal(size=(steps, *s)).astype(np.float32) for k, s in SHAPES.items()}
    x = jnp.asarray(rng.normal(size=(steps, BATCH, 4)), jnp.float32)
    batches = {"x": x, "y": x[..., :2], "example_mask": jnp.ones((steps, BATCH))}
    mask = {k: jnp.float32(k != "layer/1/w") for k in params}
    step_mask = jnp.asarray([1.0, 1, 1, 1, 1, 1, 0])  # six real steps: A = 0-2, B = 3-5
    update = C.make_client_update(
        loss_fn, _table_estimator(table), optax.sgd(0.1), report_variance=True
    )
    res = update(params, None, mask, batches, step_mask, jax.random.PRNGKey(0))

    # Independent: the release's calculate_var -- torch.var (unbiased) of the two half means,
    # averaged over elements -- over the client's masked leaves; step 3 was not estimated.
    keys = ("head/w", "layer/0/w")
    flat = np.concatenate([table[k].reshape(steps, -1) for k in keys], axis=1).astype(np.float64)
    halves = np.stack([flat[[0, 1, 2]].mean(0), flat[[4, 5]].mean(0)])
    expected = np.var(halves, axis=0, ddof=1).mean()
    np.testing.assert_allclose(float(res.variance), expected, rtol=1e-5)

    one = update(params, None, mask, batches, jnp.asarray([1.0] + [0] * 6), jax.random.PRNGKey(0))
    assert float(one.variance) == 0.0  # one real step: nothing to compare, nothing to drop
    off = C.make_client_update(loss_fn, _table_estimator(table), optax.sgd(0.1))
    assert float(off(params, None, mask, batches, step_mask, jax.random.PRNGKey(0)).variance) == 0


def test_frozen_lora_a_keeps_a_and_its_optimizer_state_through_local_training():
    """fwd.lora_a='frozen' under AdamW with weight decay: A does not move (a zero gradient would
    still be decayed and would advance Adam's count), B does."""
    model = make_toy_model()
    loss_fn = tasks.make_loss_fn(model)
    b = make_toy_batches(1, STEPS, BATCH, seed=1)
    batch = {k: v[0] for k, v in b.items() if k != "step_mask"}
    ones = {k: jnp.float32(1.0) for k in model.trainable}
    opt = C.make_client_optimizer("adamw", LR, weight_decay=WD)
    frozen = tuple(k for k in model.trainable if k.endswith("lora_a"))
    assert frozen
    est = E.forward(2, frozen_keys=frozen)
    out = C.make_local_train(loss_fn, est, opt)(
        model.trainable, model.frozen, ones, batch, jnp.ones(STEPS), jax.random.PRNGKey(3)
    )
    for k in model.trainable:
        if k in frozen:
            np.testing.assert_array_equal(out.params[k], model.trainable[k])
            assert _count(out.opt_state[k]) == 0, k
        else:
            assert np.any(np.asarray(out.params[k]) != np.asarray(model.trainable[k])), k
            assert _count(out.opt_state[k]) == STEPS, k


def test_sgd_momentum_steps_equal_a_hand_computation():
    """Heavy-ball SGD (``client.momentum``): t_1 = g_1, t_2 = m t_1 + g_2, step -lr t."""
    lr, m = 0.1, 0.9
    opt = C.make_client_optimizer("sgd", lr, momentum=m)
    w = {"w": jnp.asarray([1.0, -2.0])}
    g1, g2 = jnp.asarray([0.5, 1.0]), jnp.asarray([-1.0, 2.0])
    state = opt.init(w)
    u1, state = opt.update({"w": g1}, state, w)
    u2, _ = opt.update({"w": g2}, state, w)
    np.testing.assert_allclose(u1["w"], [-0.05, -0.1], rtol=1e-6)
    np.testing.assert_allclose(u2["w"], [-0.1 * (0.9 * 0.5 - 1.0), -0.1 * (0.9 + 2.0)], rtol=1e-6)
    plain, _ = C.make_client_optimizer("sgd", lr).update({"w": g2}, opt.init(w), w)
    np.testing.assert_allclose(plain["w"], -lr * g2, rtol=1e-6)
