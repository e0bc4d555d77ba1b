"""Why does the forward gradient on LoRA add nothing? Gradient anatomy of a Spry client step.

For the global model of a run (its init, or a saved checkpoint) and a set of real client
batches, computes the exact gradient (``jax.grad``, same dropout key as the estimator) and
reports, per group of trainable tensors (the task head, each layer's LoRA A and B):

* ``|grad|`` -- how much of the gradient each group holds;
* the signal-to-noise ratio of a forward-gradient estimate of that group, for K Gaussian tangents
  drawn jointly on a perturbed set S that contains the group u (exact, no sampling):
  ``SNR_u = K |g_u|^2 / (d_u |g_S|^2 + |g_u|^2)``, since ``Var[(g.v) v_i] = |g|^2 + g_i^2``.
  ``S`` is "what one Spry client perturbs": its LoRA unit(s) plus, with ``classifier_share``,
  the head; the script reports S = {unit, head} and S = {unit} (the head perturbed on its own);
* an empirical check of that formula on one unit (cosine of sampled estimates to ``g_u``).

    python scripts/diagnose_forward.py --workdir=DIR [--step=N] [--batches=8] [--k=1]

``DIR`` is a run directory (its ``config.json`` rebuilds the experiment); without ``--step`` the
initial weights are used, with it the saved checkpoint of that step.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from spry_jax import checkpoint as ckpt_lib
from spry_jax import config as config_lib
from spry_jax import data as data_lib
from spry_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "run directory with config.json", required=True)
flags.DEFINE_integer("step", None, "checkpoint step (default: the initial weights)")
flags.DEFINE_integer("batches", 8, "client batches to average over")
flags.DEFINE_integer("k", 1, "tangents per step in the SNR formula")
flags.DEFINE_integer("draws", 256, "sampled estimates for the empirical check")
flags.DEFINE_string("out", "", "optional JSON output path")


def group_of(key: str, head_keys: tuple[str, ...]) -> str:
    """'head', or '<layer>/<module>/<a|b>' for a LoRA leaf."""
    if key in head_keys:
        return "head"
    parts = key.split("/")
    layer = next((p for p in parts if p.isdigit()), "?")
    module = parts[-2] if len(parts) > 1 else key
    return f"L{layer}/{module}/{parts[-1]}"


def main(argv):
    del argv
    with open(os.path.join(FLAGS.workdir, "config.json")) as f:
        # Over today's defaults, so a run written before a field was added still rebuilds.
        config = config_lib.complete(json.load(f))
    exp = train.build_experiment(config)
    params = exp.model.trainable
    if FLAGS.step is not None:
        manager = ckpt_lib.Checkpointer(os.path.join(FLAGS.workdir, "checkpoints"), 1)
        identity = train._identity(exp)
        # A read-only look: only what fixes the weights' meaning (model, PEFT, data) must match,
        # so a checkpoint written before an identity field existed still opens.
        keep = ("model_fingerprint", "data_fingerprint")
        ignore = tuple(k for k in identity if k not in keep)
        state, _ = manager.restore_latest(exp.init_state(), identity, FLAGS.step, ignore)
        params = jax.device_get(state.params)
        manager.close()
    frozen = exp.model.frozen
    loss_fn = exp.spec.loss_fn
    head = exp.model.head_keys
    units = exp.spec.units

    packed = data_lib.pack_clients(
        [exp.fed.train[c] for c in range(FLAGS.batches)],
        batch_size=config.client.batch_size,
        epochs=1,
        rng=np.random.default_rng(0),
        num_slots=FLAGS.batches,
        max_steps=1,
    )
    grad_fn = jax.jit(jax.value_and_grad(lambda p, b, k: loss_fn(p, frozen, b, k)))
    sq = {k: 0.0 for k in params}
    grads = []
    for c in range(FLAGS.batches):
        batch = {k: jnp.asarray(v[c, 0]) for k, v in packed.items() if k != "step_mask"}
        _, g = grad_fn(params, batch, jax.random.PRNGKey(c))
        g = jax.device_get(g)
        grads.append((batch, g))
        for k in params:
            sq[k] += float(np.sum(np.square(g[k])))
    # Per-batch gradients are what one client step sees; report the mean over batches of the
    # per-batch squared norms (the SNR of one step), not the norm of the mean gradient.
    sq = {k: v / FLAGS.batches for k, v in sq.items()}
    size = {k: int(np.prod(v.shape)) for k, v in params.items()}

    groups: dict[str, list[str]] = {}
    for k in units.keys:
        groups.setdefault(group_of(k, head), []).append(k)
    head_sq = sum(sq[k] for k in head)
    head_d = sum(size[k] for k in head)
    rows = []
    print(f"state: {'init' if FLAGS.step is None else f'step {FLAGS.step}'}; K = {FLAGS.k}")
    print(f"{'group':28s} {'d':>6s} {'|g|':>10s} {'SNR with head':>14s} {'SNR alone':>10s}")
    for g in range(units.num_units):
        members = units.unit_members(g)
        unit_sq = sum(sq[k] for k in members)
        s_with = unit_sq + (0.0 if set(members) <= set(head) else head_sq)
        for name in sorted({group_of(k, head) for k in members}):
            keys = [k for k in members if group_of(k, head) == name]
            gs = sum(sq[k] for k in keys)
            d = sum(size[k] for k in keys)
            snr_with = FLAGS.k * gs / (d * s_with + gs) if s_with else 0.0
            snr_alone = FLAGS.k * gs / (d * unit_sq + gs) if unit_sq else 0.0
            rows.append(
                {
                    "unit": g,
                    "group": name,
                    "d": d,
                    "grad_norm": gs**0.5,
                    "snr_with_head": snr_with,
                    "snr_alone": snr_alone,
                }
            )
            print(f"{name:28s} {d:6d} {gs**0.5:10.3e} {snr_with:14.3e} {snr_alone:10.3e}")
    print(f"{'head':28s} {head_d:6d} {head_sq**0.5:10.3e}")
    norms = {group_of(k, head): float(np.linalg.norm(np.asarray(params[k]))) for k in units.keys}
    print("weight norms: " + ", ".join(f"{k} {v:.3g}" for k, v in norms.items() if k != "head"))

    # Empirical check of the SNR formula on the unit with the largest gradient: sampled
    # estimates (K = 1, joint with the head) against the exact gradient, one batch.
    batch, g = grads[0]
    best = max(range(units.num_units), key=lambda u: sum(sq[k] for k in units.unit_members(u)))
    members = [k for k in units.unit_members(best) if k not in head]
    perturbed = sorted(set(members) | set(head))
    mask = {k: jnp.float32(k in perturbed) for k in params}

    def estimate(key):
        v = {
            k: jax.random.normal(jax.random.fold_in(key, i), params[k].shape) * mask[k]
            for i, k in enumerate(sorted(params))
        }
        _, jvp = jax.jvp(
            lambda p: loss_fn(p, frozen, batch, jax.random.PRNGKey(0)), (params,), (v,)
        )
        return {k: jvp * v[k] for k in members}

    est = jax.jit(jax.vmap(estimate))(jax.random.split(jax.random.PRNGKey(1), FLAGS.draws))
    g_u = np.concatenate([np.ravel(g[k]) for k in members])
    e_u = np.concatenate([np.asarray(est[k]).reshape(FLAGS.draws, -1) for k in members], axis=1)
    noise = np.mean(np.sum(np.square(e_u - g_u), axis=1))
    s_all = float(sum(np.sum(np.square(g[k])) for k in perturbed))
    predicted = len(g_u) * s_all + float(np.sum(np.square(g_u)))
    print(
        f"check (unit {best}, one batch, {FLAGS.draws} draws): E|noise|^2 sampled {noise:.4e}, "
        f"formula {predicted:.4e}"
    )
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(
                {
                    "rows": rows,
                    "head_grad_norm": float(head_sq**0.5),
                    "check": [float(noise), float(predicted)],
                },
                f,
            )


if __name__ == "__main__":
    app.run(main)
