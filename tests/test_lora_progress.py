"""scripts/lora_progress.py: the adapter-only progress measurement (exact vs forward gradients).

Its arm grammar, the exact-equivalent-steps interpolation against a hand computation, one
exact SGD step against ``jax.grad`` of the same loss with the same dropout key, masked leaves
untouched, and a whole run on the smoke model that reads only the validation split.
"""

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import smoke
from spry_jax import train
from spry_jax.core import client as C
from spry_jax.core import estimators as E

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "lora_progress", os.path.join(ROOT, "scripts", "lora_progress.py")
)
lp = importlib.util.module_from_spec(_spec)
sys.modules["lora_progress"] = lp  # its dataclass resolves its module by name
_spec.loader.exec_module(lp)


def _config():
    cfg = smoke.get_config()
    cfg.round.backend = "vmap"
    cfg.data.val_fraction = 0.2
    return cfg


def test_arm_grammar_and_its_errors():
    a = lp.parse_arm("fwd4:sgd:m0.9:rademacher@0.1")
    assert (a.tangents, a.optimizer, a.momentum, a.distribution, a.lr) == (
        4,
        "sgd",
        0.9,
        "rademacher",
        0.1,
    )
    assert a.family == "fwd4:sgd:m0.9:rademacher"
    e = lp.parse_arm("exact@3e-3")
    assert (e.tangents, e.optimizer, e.distribution, e.lr) == (0, "adamw", "gaussian", 3e-3)
    for bad, match in [
        ("fwd4", "NAME@LR"),
        ("fwd4@fast", "not a number"),
        ("fwd0@1e-3", "fwdK"),
        ("grad@1e-3", "fwdK"),
        ("fwd4:nesterov@1e-3", "unknown modifier"),
        ("fwd4:m0.9@1e-3", "momentum is SGD's"),
    ]:
        with pytest.raises(ValueError, match=match):
            lp.parse_arm(bad)


def test_cosine_arm_scales_each_step_by_the_decayed_lr():
    """SGD with the cosine schedule over 2 steps: step 0 at lr, step 1 at lr (1 + cos(pi/2)) / 2;
    AdamW's weight decay is scaled with the lr, as optax.adamw(schedule) does."""
    arm = lp.parse_arm("exact:sgd:cosine@0.4")
    assert arm.schedule == "cosine"
    opt = lp.arm_optimizer(arm, weight_decay=0.0, steps=2)
    w, g = jnp.asarray([1.0, -1.0]), jnp.asarray([0.5, 2.0])
    state = opt.init(w)
    u0, state = opt.update(g, state, w)
    u1, _ = opt.update(g, state, w)
    np.testing.assert_allclose(u0, -0.4 * g, rtol=1e-6)
    np.testing.assert_allclose(u1, -0.2 * g, rtol=1e-6)
    adam = lp.arm_optimizer(lp.parse_arm("exact:cosine@1e-2"), weight_decay=0.1, steps=4)
    want = optax.adamw(optax.cosine_decay_schedule(1e-2, 4), weight_decay=0.1)
    sa, sw = adam.init(w), want.init(w)
    for _ in range(3):
        ua, sa = adam.update(g, sa, w)
        uw, sw = want.update(g, sw, w)
        np.testing.assert_allclose(ua, uw, rtol=1e-6)
    constant = lp.arm_optimizer(lp.parse_arm("exact:sgd@0.4"), weight_decay=0.0, steps=2)
    c_state = constant.init(w)
    _, c_state = constant.update(g, c_state, w)
    np.testing.assert_allclose(constant.update(g, c_state, w)[0], -0.4 * g, rtol=1e-6)


def test_exact_equivalent_steps_interpolate_the_exact_curve():
    curve = [
        {"step": 0, "val_loss": 1.0},
        {"step": 10, "val_loss": 0.9},  # drop 0.1
        {"step": 30, "val_loss": 0.6},  # drop 0.4
    ]
    assert lp.exact_equivalent_steps(curve, 0.05) == pytest.approx(5.0)
    # between 10 (0.1) and 30 (0.4): 10 + (0.25 - 0.1) / 0.3 * 20
    assert lp.exact_equivalent_steps(curve, 0.25) == pytest.approx(20.0)
    assert lp.exact_equivalent_steps(curve, 0.5) is None
    assert lp.exact_equivalent_steps(curve, -0.1) == 0.0


def test_merged_runs_share_one_exact_reference():
    probe = {"steps": 1, "lr": 1e-2, "curve": [{"step": 1, "val_loss": 1.0}]}

    def run_of(*arms):
        return {"seed": 1, "steps": 30, "adapter_weights": 8, "probe": probe, "arms": list(arms)}

    def arm(name, tangents, losses):
        curve = [{"step": s, "val_loss": v} for s, v in zip((0, 10, 30), losses, strict=True)]
        return {"name": name, "tangents": tangents, "curve": curve}

    exact = arm("exact@1e-3", 0, (1.0, 0.9, 0.6))
    a = run_of(exact, arm("fwd4@1e-3", 4, (1.0, 0.99, 0.95)))
    b = run_of(exact, arm("fwd1@1e-3", 1, (1.0, 1.0, 0.9)))
    # the same numbers from another process differ only in their wall-clock fields
    b["probe"] = {**probe, "curve": [{**probe["curve"][0], "wall_s": 9.0}]}
    got = lp.merge([a, b])
    assert [r["name"] for r in got["arms"]] == ["exact@1e-3", "fwd4@1e-3", "fwd1@1e-3"]
    eq = {r["name"]: r["exact_equivalent_steps"] for r in got["arms"]}
    assert eq == pytest.approx({"exact@1e-3": 30.0, "fwd4@1e-3": 5.0, "fwd1@1e-3": 10.0})
    with pytest.raises(ValueError, match="seed"):
        lp.merge([a, {**b, "seed": 2}])
    with pytest.raises(ValueError, match="differs"):
        lp.merge([a, run_of(arm("exact@1e-3", 0, (1.0, 0.8, 0.6)))])


def test_one_exact_sgd_step_equals_jax_grad_and_masked_leaves_stay():
    exp = train.build_experiment(_config())
    params = exp.model.trainable
    adapters = {k for k in params if k not in exp.model.head_keys}
    mask = {k: jnp.float32(k in adapters) for k in params}
    batches = {k: jnp.asarray(v[:1]) for k, v in lp.pooled_batches(exp, 1, 0).items()}
    key, lr = jax.random.PRNGKey(3), 0.5
    run = lp.make_trainer(exp, E.backprop(), C.make_client_optimizer("sgd", lr), mask)
    opt = C.make_client_optimizer("sgd", lr)
    got, _, losses = run(params, {k: opt.init(p) for k, p in params.items()}, batches, key, 0)
    drop_key, _ = C.step_keys(key, 0)
    batch = {k: v[0] for k, v in batches.items()}
    # jitted: eager grad compiles every op of the model on its own (minutes on a cold cache)
    value_and_grad = jax.jit(
        jax.value_and_grad(lambda p: exp.spec.loss_fn(p, exp.model.frozen, batch, drop_key))
    )
    loss, grad = value_and_grad(params)
    np.testing.assert_allclose(losses[0], loss, rtol=1e-6)
    moved = 0.0
    for k in params:
        want = params[k] - lr * grad[k] if k in adapters else params[k]
        np.testing.assert_allclose(got[k], want, rtol=1e-5, atol=1e-7, err_msg=k)
        moved += float(jnp.sum(jnp.abs(got[k] - params[k])))
    assert moved > 0  # the step did something (a LoRA B gradient is non-zero at B = 0)


def test_a_run_scores_only_on_validation_and_reports_every_arm(monkeypatch):
    splits = []
    build = train.build_experiment

    def spying_build(config):
        exp = build(config)
        all_clients = exp.evaluator.all_clients

        def spy(params, frozen, split="test"):
            splits.append(split)
            return all_clients(params, frozen, split=split)

        monkeypatch.setattr(exp.evaluator, "all_clients", spy)
        return exp

    monkeypatch.setattr(lp.train, "build_experiment", spying_build)
    arms = [lp.parse_arm(a) for a in ("exact@5e-2", "fwd2@5e-2", "fwd2:sgd@0.5")]
    out = lp.run(_config(), arms, steps=4, eval_at=[2, 4], head_steps=3, head_lr=1e-2, seed=0)
    assert splits and set(splits) == {"val"}
    assert [r["name"] for r in out["arms"]] == ["exact@5e-2", "fwd2@5e-2", "fwd2:sgd@0.5"]
    starts = {r["curve"][0]["val_loss"] for r in out["arms"]}
    assert len(starts) == 1  # every arm starts from the same probe
    assert starts == {out["probe"]["curve"][-1]["val_loss"]}
    for r in out["arms"]:
        assert [p["step"] for p in r["curve"]] == [0, 2, 4]
        assert r["flops_per_step"] > 0 and r["exact_reference"] == "exact@5e-2"
    fwd, exact = out["arms"][1]["flops_per_step"], out["arms"][0]["flops_per_step"]
    assert fwd != exact
    assert "exact-equivalent steps" in lp.table(out)
    with pytest.raises(ValueError, match="data.val_fraction"):
        cfg = _config()
        cfg.data.val_fraction = 0.0
        lp.run(cfg, arms, steps=4, eval_at=[4], head_steps=1, head_lr=1e-2, seed=0)
    with pytest.raises(ValueError, match="eval_at"):
        lp.run(_config(), arms, steps=4, eval_at=[2], head_steps=1, head_lr=1e-2, seed=0)
