"""How much of an exact gradient's progress does one forward-gradient step buy on the adapters?

The floor study (docs/spry_learns.md) extrapolates from the variance of the estimator: a step
of K Gaussian tangents on d perturbed weights carries about K / (d + K) of an exact gradient's
information, so Spry's LoRA would need ~d / K times backprop's steps. This script measures that
ratio directly, without the federated noise (client sampling, label skew, one unit per client):

1. **Probe.** The task head alone is trained by its exact gradient on the pooled training data
   of every client (``--head_steps`` AdamW steps at ``--head_lr``): a linear probe, the
   state from which only the adapters can add anything.
2. **Adapters only.** From that state each arm trains the LoRA weights alone (the head frozen at
   the probe) for ``--steps`` local steps of the config's batch, with the library's own
   estimators, optimizers and step keys (``core.client.estimate_step``, ``leafwise_step``):
   ``exact`` is ``jax.grad`` (the backprop estimator), ``fwdK`` the forward gradient with K
   tangents on every LoRA leaf at once. Every arm sees the same batches and dropout keys.
3. **Scores** on every client's validation split (never the test split): the loss and accuracy
   at the ``--eval_at`` steps. A forward arm's *exact-equivalent steps* are the steps the exact
   arm at the same-family best learning rate needed to reach the forward arm's final
   validation-loss drop (interpolated on its curve); their ratio to the forward arm's steps is
   the fraction of an exact step's progress one forward step bought. The exact curve is not
   always monotone (AdamW spikes at some learning rates and seeds), which makes this figure
   jumpy: read it beside the curves and the plain loss drops.

Arms: ``NAME@LR`` with NAME ``exact`` or ``fwdK`` and optional ``:`` modifiers: a client
optimizer (``adamw``, the default, ``adam``, ``sgd``), a tangent distribution (``gaussian``,
the default, ``rademacher``), a schedule (``constant``, the default, or ``cosine``: the lr
decays to 0 over the arm's steps), ``mM`` for SGD momentum M. E.g.
``--arms=exact@1e-3,fwd4@3e-3,fwd4:sgd@0.1,fwd4:rademacher@3e-3``.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python scripts/lora_progress.py \\
      --config=experiments/quickstart.py --config.data.val_fraction=0.1 \\
      --arms=exact@1e-3,exact@3e-3,fwd4@1e-3,fwd4@3e-3 --steps=400 --out=runs/lora_progress.json

``--merge=a.json,b.json`` joins the outputs of runs that split the arms of one seed over
several processes (same probe, seed and steps) and prints their joint table.

Prints one table (per arm: validation loss and accuracy at each eval step, GFLOP per step from
XLA's cost analysis, exact-equivalent steps) and writes the curves as JSON to ``--out``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

from spry_jax import data as data_lib
from spry_jax import train
from spry_jax.core import client as client_lib
from spry_jax.core import estimators as est_lib


@dataclasses.dataclass(frozen=True)
class ArmSpec:
    """One adapter-only arm: estimator (exact or K forward tangents), optimizer, lr."""

    name: str
    lr: float
    tangents: int = 0  # 0 = the exact gradient
    optimizer: str = "adamw"
    distribution: str = "gaussian"
    momentum: float = 0.0
    schedule: str = "constant"  # or "cosine": the lr decays to 0 over the arm's steps

    @property
    def family(self) -> str:
        """The arm without its learning rate (the best lr is chosen per family)."""
        return self.name.rsplit("@", 1)[0]


def parse_arm(text: str) -> ArmSpec:
    """``NAME[:MOD...]@LR`` -> :class:`ArmSpec`; a clear error naming the arm otherwise."""
    head, sep, lr = text.strip().rpartition("@")
    if not sep:
        raise ValueError(f"arm {text!r}: write NAME@LR, e.g. fwd4@3e-3")
    try:
        lr_value = float(lr)
    except ValueError:
        raise ValueError(f"arm {text!r}: learning rate {lr!r} is not a number") from None
    base, *mods = head.split(":")
    if base == "exact":
        tangents = 0
    elif base.startswith("fwd") and base[3:].isdigit() and int(base[3:]) >= 1:
        tangents = int(base[3:])
    else:
        raise ValueError(f"arm {text!r}: {base!r} is neither 'exact' nor 'fwdK' (K >= 1)")
    kw = {}
    for m in mods:
        if m in client_lib.CLIENT_OPTIMIZERS:
            kw["optimizer"] = m
        elif m in est_lib.TANGENT_DISTRIBUTIONS:
            kw["distribution"] = m
        elif m in ("constant", "cosine"):
            kw["schedule"] = m
        elif m.startswith("m"):
            kw["momentum"] = float(m[1:])
        else:
            raise ValueError(
                f"arm {text!r}: unknown modifier {m!r}; use an optimizer "
                f"{client_lib.CLIENT_OPTIMIZERS}, a distribution {est_lib.TANGENT_DISTRIBUTIONS},"
                " a schedule (constant, cosine) or mM (SGD momentum)"
            )
    if kw.get("momentum") and kw.get("optimizer") != "sgd":
        raise ValueError(f"arm {text!r}: momentum is SGD's; add ':sgd'")
    return ArmSpec(name=text.strip(), lr=lr_value, tangents=tangents, **kw)


def arm_optimizer(arm: ArmSpec, weight_decay: float, steps: int):
    """The client optimizer of ``arm`` (``core.client.make_client_optimizer``); with the
    ``cosine`` schedule its update is scaled by ``optax.cosine_decay_schedule(lr, steps)``
    (the optimizer built at lr 1, so AdamW's weight decay is scaled with it, as
    ``optax.adamw(schedule)`` does)."""
    if arm.schedule == "constant":
        return client_lib.make_client_optimizer(
            arm.optimizer, arm.lr, weight_decay=weight_decay, momentum=arm.momentum
        )
    base = client_lib.make_client_optimizer(
        arm.optimizer, 1.0, weight_decay=weight_decay, momentum=arm.momentum
    )
    return optax.chain(base, optax.scale_by_schedule(optax.cosine_decay_schedule(arm.lr, steps)))


def pooled_batches(exp, steps: int, seed: int) -> dict[str, np.ndarray]:
    """``steps`` batches ``[steps, B, ...]`` of every client's training split pooled, shuffled
    per epoch (``data.pack_clients`` on one slot), with ``example_mask``."""
    pooled = {
        k: np.concatenate([c[k] for c in exp.fed.train]) for k in exp.fed.train[0] if k != "offsets"
    }
    cfg = exp.config.client
    n = len(pooled["labels"])
    epochs = max(1, -(-steps * cfg.batch_size // n))
    packed = data_lib.pack_clients(
        [pooled],
        batch_size=cfg.batch_size,
        epochs=epochs,
        rng=np.random.default_rng(seed),
        max_steps=steps,
    )
    return {k: v[0] for k, v in packed.items() if k != "step_mask"}


def make_trainer(exp, estimator, optimizer, mask):
    """``run(params, states, batches, key, start) -> (params, states, losses)``: the scanned
    local steps of ``core.client`` (its step keys, estimate and leafwise optimizer step),
    jitted; ``states`` per leaf, kept across calls (unlike a round's fresh client state)."""
    loss_fn, frozen = exp.spec.loss_fn, exp.model.frozen

    def step(carry, xs):
        params, states = carry
        batch, i, key = xs
        est = client_lib.estimate_step(estimator, loss_fn, params, frozen, mask, batch, key, i)
        active = client_lib.estimated_leaves(est, mask)
        params, states = client_lib.leafwise_step(optimizer, est.grad, states, params, active)
        return (params, states), est.loss

    @jax.jit
    def run(params, states, batches, key, start):
        n = jax.tree.leaves(batches)[0].shape[0]
        idx = start + jnp.arange(n)
        (params, states), losses = jax.lax.scan(
            step, (params, states), (batches, idx, jnp.broadcast_to(key, (n, *key.shape)))
        )
        return params, states, losses

    return run


def _slice(batches, a, b):
    return {k: jnp.asarray(v[a:b]) for k, v in batches.items()}


def train_arm(exp, params, estimator, optimizer, mask, batches, key, eval_at, score):
    """Trains from ``params`` through ``batches``, scoring at each step of ``eval_at``.

    Returns ``(params, curve, flops_per_step)``; ``curve`` holds step 0 and every eval step."""
    run = make_trainer(exp, estimator, optimizer, mask)
    states = {k: optimizer.init(p) for k, p in params.items()}
    one = run.lower(params, states, _slice(batches, 0, 1), key, 0).compile()
    flops = float((one.cost_analysis() or {}).get("flops", float("nan")))
    # One scan length for every call (the gcd of the eval intervals), so the steps compile once
    # rather than once per distinct interval.
    chunk = math.gcd(*np.diff([0, *eval_at]).tolist())
    curve, done, losses = [{"step": 0, **score(params)}], 0, []
    t0 = time.time()
    for stop in eval_at:
        for start in range(done, stop, chunk):
            params, states, part = run(
                params, states, _slice(batches, start, start + chunk), key, start
            )
            losses.append(np.asarray(part))
        done = stop
        curve.append(
            {
                "step": stop,
                "train_loss": float(np.mean(np.concatenate(losses))),
                "wall_s": round(time.time() - t0, 1),
                **score(params),
            }
        )
        losses = []
    return params, curve, flops


def exact_equivalent_steps(exact_curve: list[dict], drop: float) -> float | None:
    """The steps the exact arm needed for a validation-loss drop of ``drop`` (linear
    interpolation on its curve); None if it never dropped that far, 0 for no drop."""
    if drop <= 0:
        return 0.0
    base = exact_curve[0]["val_loss"]
    prev_step, prev_drop = 0, 0.0
    for point in exact_curve[1:]:
        d = base - point["val_loss"]
        if d >= drop:
            frac = (drop - prev_drop) / (d - prev_drop)
            return prev_step + frac * (point["step"] - prev_step)
        if d > prev_drop:
            prev_step, prev_drop = point["step"], d
    return None


def run(
    config,
    arms: list[ArmSpec],
    steps: int,
    eval_at: list[int],
    head_steps: int,
    head_lr: float,
    seed: int,
) -> dict:
    if config.data.val_fraction <= 0:
        raise ValueError(
            "data.val_fraction must be > 0: arms are scored on the clients' validation split "
            "(pass --config.data.val_fraction=0.1)"
        )
    if not eval_at or sorted(set(eval_at)) != list(eval_at) or eval_at[-1] != steps:
        raise ValueError(f"eval_at must be increasing and end at steps={steps}, got {eval_at}")
    exp = train.build_experiment(config)
    params0 = exp.model.trainable
    head = set(exp.model.head_keys)
    adapters = sorted(k for k in params0 if k not in head)
    if not head or not adapters:
        raise ValueError(
            f"peft.method={config.peft.method!r}: needs adapters and a task head "
            f"(head {sorted(head)}, adapters {adapters})"
        )
    frozen = exp.model.frozen

    def score(p):
        rec = exp.evaluator.all_clients(p, frozen, split="val")
        return {
            "val_loss": float(rec["eval/all_clients_val_loss"]),
            "val_accuracy": float(rec["eval/all_clients_val_accuracy"]),
        }

    def mask_of(keys):
        return {k: jnp.float32(k in keys) for k in params0}

    key = jax.random.PRNGKey(seed)
    # 1. The probe: the head alone, exact gradient.
    head_opt = client_lib.make_client_optimizer(
        "adamw", head_lr, weight_decay=config.client.weight_decay
    )
    probe_batches = pooled_batches(exp, head_steps, seed + 1000)
    probe, probe_curve, _ = train_arm(
        exp,
        params0,
        est_lib.backprop(),
        head_opt,
        mask_of(head),
        probe_batches,
        jax.random.fold_in(key, 1),
        [head_steps],
        score,
    )
    # 2. Adapters only, the same batches and step keys for every arm.
    batches = pooled_batches(exp, steps, seed)
    arm_key = jax.random.fold_in(key, 2)
    results = []
    for arm in arms:
        estimator = (
            est_lib.backprop()
            if arm.tangents == 0
            else est_lib.forward(
                num_tangents=arm.tangents, sigma=config.fwd.sigma, distribution=arm.distribution
            )
        )
        opt = arm_optimizer(arm, config.client.weight_decay, steps)
        _, curve, flops = train_arm(
            exp, probe, estimator, opt, mask_of(set(adapters)), batches, arm_key, eval_at, score
        )
        results.append(
            {
                **dataclasses.asdict(arm),
                "family": arm.family,
                "flops_per_step": flops,
                "curve": curve,
            }
        )
        print(
            f"{arm.name}: val loss {curve[0]['val_loss']:.4f} -> {curve[-1]['val_loss']:.4f}, "
            f"accuracy {curve[0]['val_accuracy']:.4f} -> {curve[-1]['val_accuracy']:.4f} "
            f"({curve[-1]['wall_s']} s)",
            flush=True,
        )
    _equivalents(results, steps)
    d = int(sum(np.prod(params0[k].shape) for k in adapters))
    return {
        "adapter_weights": d,
        "probe": {"steps": head_steps, "lr": head_lr, "curve": probe_curve},
        "steps": steps,
        "seed": seed,
        "arms": results,
    }


def _equivalents(results: list[dict], steps: int) -> None:
    """Adds ``exact_equivalent_steps`` and ``progress_per_step`` (their ratio to ``steps``) to
    every arm, against the exact arm with the lowest final validation loss."""
    exact = [r for r in results if r["tangents"] == 0]
    if not exact:
        return
    best = min(exact, key=lambda r: r["curve"][-1]["val_loss"])
    for r in results:
        drop = r["curve"][0]["val_loss"] - r["curve"][-1]["val_loss"]
        eq = exact_equivalent_steps(best["curve"], drop)
        r["val_loss_drop"] = drop
        r["exact_reference"] = best["name"]
        r["exact_equivalent_steps"] = eq
        r["progress_per_step"] = None if eq is None else eq / steps


def _timeless(x):
    """``x`` without its wall-clock fields (they differ between runs of the same numbers)."""
    if isinstance(x, dict):
        return {k: _timeless(v) for k, v in x.items() if k != "wall_s"}
    if isinstance(x, list):
        return [_timeless(v) for v in x]
    return x


def merge(results: list[dict]) -> dict:
    """One result from several runs of the same probe, seed and steps (arms split over
    processes): the arms in order, a repeated arm once, equivalents recomputed over all."""
    first = results[0]
    for r in results[1:]:
        for field in ("seed", "steps", "adapter_weights", "probe"):
            if _timeless(r[field]) != _timeless(first[field]):
                raise ValueError(
                    f"cannot merge runs with different {field!r}: {r[field]!r} vs {first[field]!r}"
                )
    arms, seen = [], {}
    for r in results:
        for arm in r["arms"]:
            if arm["name"] in seen:
                if _timeless(seen[arm["name"]]["curve"]) != _timeless(arm["curve"]):
                    raise ValueError(f"arm {arm['name']!r} differs between the merged runs")
                continue
            seen[arm["name"]] = arm
            arms.append(dict(arm))
    out = {**first, "arms": arms}
    _equivalents(arms, first["steps"])
    return out


def table(result: dict) -> str:
    evals = [p["step"] for p in result["arms"][0]["curve"]]
    head = "| arm | GFLOP/step | " + " | ".join(f"val loss @{s}" for s in evals)
    head += (
        " | lowest val loss (step) | val acc (start -> end) | exact-equivalent steps (per step) |"
    )
    lines = [head, "|" + "---|" * (len(evals) + 5)]
    for r in result["arms"]:
        c = r["curve"]
        eq = r.get("exact_equivalent_steps")
        eq_s = (
            "n/a"
            if "exact_equivalent_steps" not in r
            else "0 (no drop: the loss rose)"
            if r.get("val_loss_drop", 1.0) <= 0
            else (
                f"> {result['steps']} (not reached)"
                if eq is None
                else f"{eq:.1f} ({r['progress_per_step']:.3g})"
            )
        )
        lines.append(
            f"| {r['name']} | {r['flops_per_step'] / 1e9:.2f} | "
            + " | ".join(f"{p['val_loss']:.4f}" for p in c)
            + " | {val_loss:.4f} ({step})".format(**min(c, key=lambda p: p["val_loss"]))
            + f" | {c[0]['val_accuracy']:.4f} -> {c[-1]['val_accuracy']:.4f} | {eq_s} |"
        )
    p = result["probe"]["curve"]
    lines.append(
        f"\nprobe (head only, exact, {result['probe']['steps']} steps at lr {result['probe']['lr']}): "
        f"val loss {p[0]['val_loss']:.4f} -> {p[-1]['val_loss']:.4f}, accuracy "
        f"{p[0]['val_accuracy']:.4f} -> {p[-1]['val_accuracy']:.4f}; adapter weights d = "
        f"{result['adapter_weights']}"
    )
    return "\n".join(lines)


def _define_flags():
    """The command line (defined only when run as a script, so importing it -- tests -- adds
    no absl flags to the importer's)."""
    config_flags.DEFINE_config_file("config", "experiments/quickstart.py", "Run config.")
    flags.DEFINE_list("arms", ["exact@1e-3", "fwd4@3e-3"], "Arms, NAME[:MOD...]@LR.")
    flags.DEFINE_integer("steps", 400, "Adapter-only steps per arm.")
    flags.DEFINE_list("eval_at", ["25", "50", "100", "200", "400"], "Steps to score at.")
    flags.DEFINE_integer("head_steps", 400, "Exact-gradient steps of the head probe.")
    flags.DEFINE_float("head_lr", 6e-3, "AdamW learning rate of the head probe.")
    flags.DEFINE_integer("seed", 1, "Seed of the batches, dropout and tangents.")
    flags.DEFINE_string("out", "", "JSON output path (optional).")
    flags.DEFINE_list("merge", [], "Instead of running: merge these output JSONs and print.")


def main(argv):
    del argv
    f = flags.FLAGS
    if f.merge:
        parts = []
        for path in f.merge:
            with open(path) as fh:
                parts.append(json.load(fh))
        result = merge(parts)
    else:
        arms = [parse_arm(a) for a in f.arms]
        result = run(
            f.config, arms, f.steps, [int(s) for s in f.eval_at], f.head_steps, f.head_lr, f.seed
        )
    print(table(result))
    if f.out:
        os.makedirs(os.path.dirname(os.path.abspath(f.out)), exist_ok=True)
        with open(f.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
