"""Gradient fidelity: cosine similarity of each estimator to the true gradient (``jax.grad``).

On real MiniLM (all-MiniLM-L6-v2 with LoRA r=1 on query/value and a 2-way head) and one real
Rotten Tomatoes batch (8 examples, 64 tokens, dropout off so the loss is deterministic), for
the gradient of the loss with respect to the trainable weights:

* **Spry** -- each of the M clients of a round draws K tangents on its own units only
  (the round's unit assignment, :mod:`spry_jax.core.units`); ``per-client`` is the mean cosine of a client's estimate to the
  true gradient restricted to its units; ``round`` is the cosine of the whole round's estimate
  (each unit from the clients that hold it, averaged over them) to the full gradient.
* **FedFGD** -- K tangents on all trainable weights (no split); one client's estimate.
* **MeZO** -- zero-order SPSA (the FedMeZO estimator, ``spry_jax.core.zero_order.spsa``,
  eps 1e-3), K perturbations on all trainable weights.

Cosines are averaged over ``--repeats`` independent keys. Curves: vs K at M = 10 (the paper's
clients per round) and vs M at K = 1. Writes ``fidelity.json`` and ``fidelity.png`` to
``--out``::

    python -m spry_jax.bench.fidelity --out=docs
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from spry_jax import data as data_lib  # noqa: E402
from spry_jax import models, tasks  # noqa: E402
from spry_jax.core import aggregation, estimators, zero_order  # noqa: E402
from spry_jax.core import units as units_lib  # noqa: E402
from spry_jax.types import Batch, SplitModel, Trainable  # noqa: E402


def load_problem(
    model_name: str = "minilm", batch: int = 8, seq: int = 64, pretrained: bool = True
) -> tuple[SplitModel, Batch]:
    """The model (LoRA r=1, dropout 0) and one Rotten Tomatoes batch of ``batch`` examples."""
    model = models.make_split_model(
        dict(name=model_name, pretrained=pretrained, dtype="float32", dropout=0.0),
        dict(method="lora", lora_rank=1, lora_alpha=1.0, lora_dropout=0.0, target_modules=[]),
        task="classification",
        num_labels=2,
    )
    ds = data_lib.load_dataset({"name": "rotten_tomatoes", "max_examples": 256})
    tok = models.load_tokenizer(model_name)
    # A batch with both labels, so the head's gradient is not degenerate.
    idx = np.concatenate([np.flatnonzero(ds.labels == c)[: batch // 2] for c in (0, 1)])[:batch]
    enc = tok(
        [ds.texts[i] for i in idx],
        padding="max_length",
        truncation=True,
        max_length=seq,
        return_tensors="np",
    )
    b = {
        "input_ids": jnp.asarray(enc["input_ids"], jnp.int32),
        "attention_mask": jnp.asarray(enc["attention_mask"], jnp.int32),
        "labels": jnp.asarray(ds.labels[idx], jnp.int32),
        "example_mask": jnp.ones((len(idx),), jnp.float32),
    }
    return model, b


def _dot(a: Trainable, b: Trainable) -> jax.Array:
    return sum(jnp.vdot(a[k].ravel(), b[k].ravel()) for k in a)


def cosine(a: Trainable, b: Trainable, mask: Trainable | None = None) -> jax.Array:
    """Cosine similarity of two flat dicts, optionally on the leaves where ``mask`` is 1."""
    if mask is not None:
        a = {k: v * mask[k] for k, v in a.items()}
        b = {k: v * mask[k] for k, v in b.items()}
    return _dot(a, b) / jnp.sqrt(_dot(a, a) * _dot(b, b))


def make_fidelity_fns(model: SplitModel, batch: Batch):
    """Jitted ``(true_grad, estimate(kind, K)(params, mask, key) -> grad)`` for the problem."""
    loss_fn = tasks.make_loss_fn(model)

    def f(w):
        return loss_fn(w, model.frozen, batch, None)

    true_grad = jax.jit(jax.grad(f))

    def estimate_fn(kind: str, num: int):
        if kind == "forward":
            est = estimators.forward(num, 1.0, "vmap")
        elif kind == "mezo":
            est = zero_order.spsa(num, 1e-3)
        else:
            raise ValueError(f"kind={kind!r}; choose 'forward' or 'mezo'.")
        return jax.jit(lambda p, m, k: est(f, p, m, k).grad)

    return true_grad, estimate_fn


def spry_round(
    estimate, params: Trainable, units: units_lib.Units, num_clients: int, key: jax.Array
) -> tuple[Trainable, list[tuple[Trainable, Trainable]], Trainable]:
    """One round of Spry estimates: per-client grads on their units, averaged per unit with
    the round's own per-unit mean (:mod:`spry_jax.core.aggregation`, every client weighted 1).

    Returns (round estimate, per client (mask, estimate), per-leaf client counts)."""
    assignment = units_lib.assign_units(jax.random.fold_in(key, 0), num_clients, units.num_units)
    masks = units_lib.unit_masks(units, assignment)
    num = {k: jnp.zeros_like(v) for k, v in params.items()}
    den = {k: jnp.zeros((), jnp.float32) for k in params}
    client_masks = []
    for c in range(num_clients):
        mask = {k: masks[k][c] for k in params}
        g = estimate(params, mask, jax.random.fold_in(key, c + 1))
        n, d = aggregation.weighted_sums(g, mask, jnp.float32(1.0))
        num = {k: num[k] + n[k] for k in num}
        den = {k: den[k] + d[k] for k in den}
        client_masks.append((mask, g))
    return aggregation.finalize(num, den), client_masks, den


def run(
    model: SplitModel,
    batch: Batch,
    ks: list[int],
    ms: list[int],
    repeats: int,
    m_for_k: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    """All curves: ``{"vs_k": [...], "vs_m": [...]}`` rows of mean cosines over repeats."""
    true_grad, estimate_fn = make_fidelity_fns(model, batch)
    params = model.trainable
    g = true_grad(params)
    ones = {k: jnp.ones((), jnp.float32) for k in params}
    units = units_lib.make_units(model.order, 2, model.head_keys, peft_method=model.peft_method)
    base = jax.random.PRNGKey(seed)

    def point(num_k: int, num_m: int, with_baselines: bool) -> dict[str, Any]:
        fwd = estimate_fn("forward", num_k)
        per_client, whole = [], []
        fgd, mezo = [], []
        for r in range(repeats):
            key = jax.random.fold_in(jax.random.fold_in(base, num_k * 1000 + num_m), r)
            est, clients, _ = spry_round(fwd, params, units, num_m, key)
            whole.append(float(cosine(est, g)))
            per_client += [float(cosine(gc, g, m)) for m, gc in clients]
            if with_baselines:
                fgd.append(float(cosine(fwd(params, ones, jax.random.fold_in(key, 10_001)), g)))
                zo = estimate_fn("mezo", num_k)(params, ones, jax.random.fold_in(key, 10_002))
                mezo.append(float(cosine(zo, g)))
        row = dict(
            K=num_k,
            M=num_m,
            spry_per_client=float(np.mean(per_client)),
            spry_per_client_std=float(np.std(per_client)),
            spry_round=float(np.mean(whole)),
            spry_round_std=float(np.std(whole)),
        )
        if with_baselines:
            row.update(
                fedfgd=float(np.mean(fgd)),
                fedfgd_std=float(np.std(fgd)),
                mezo=float(np.mean(mezo)),
                mezo_std=float(np.std(mezo)),
            )
        return row

    vs_k = [point(k, m_for_k, True) for k in ks]
    vs_m = [point(1, m, False) for m in ms]
    d = int(sum(v.size for v in params.values()))
    return dict(
        trainable_params=d,
        num_units=units.num_units,
        repeats=repeats,
        M_for_K=m_for_k,
        grad_norm=float(jnp.sqrt(_dot(g, g))),
        vs_k=vs_k,
        vs_m=vs_m,
    )


def _curves(ax: Any, rows: list[dict[str, Any]], x: str, series: tuple) -> None:
    """Mean cosine with its standard deviation against ``x`` for each ``(key, label)``."""
    xs = [r[x] for r in rows]
    for key, label in series:
        ax.errorbar(
            xs,
            [r[key] for r in rows],
            yerr=[r[key + "_std"] for r in rows],
            marker="o",
            capsize=2,
            label=label,
        )
    ax.set_xscale("log", base=2)


def plot(result: dict[str, Any], path: str) -> None:
    """Two panels: cosine vs K (at M = 10) and vs clients per round M (K = 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    _curves(
        a,
        result["vs_k"],
        "K",
        (
            ("spry_per_client", "Spry, per client (its units)"),
            ("spry_round", "Spry, whole round"),
            ("fedfgd", "FedFGD (all weights)"),
            ("mezo", "MeZO / SPSA (all weights)"),
        ),
    )
    a.set_xlabel("K (tangents / perturbations per step)")
    a.set_ylabel("cosine to jax.grad")
    a.set_title(f"vs K (M = {result['M_for_K']})")
    a.legend(fontsize=7)
    _curves(
        b,
        result["vs_m"],
        "M",
        (("spry_per_client", "Spry, per client"), ("spry_round", "Spry, whole round")),
    )
    b.set_xlabel(f"clients per round M ({result['num_units']} units)")
    b.set_title("vs M (K = 1)")
    b.legend(fontsize=7)
    fig.suptitle(
        f"MiniLM + LoRA r=1 ({result['trainable_params']} trainable), Rotten Tomatoes batch",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    """The two curves as markdown tables."""
    lines = [
        f"| K (M = {result['M_for_K']}) | Spry per client | Spry round | FedFGD | MeZO |",
        "|---|---|---|---|---|",
    ]
    for r in result["vs_k"]:
        lines.append(
            f"| {r['K']} | {r['spry_per_client']:.3f} | {r['spry_round']:.3f} | "
            f"{r['fedfgd']:.3f} | {r['mezo']:.3f} |"
        )
    lines += ["", "| M (K = 1) | Spry per client | Spry round |", "|---|---|---|"]
    for r in result["vs_m"]:
        lines.append(f"| {r['M']} | {r['spry_per_client']:.3f} | {r['spry_round']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for fidelity.json/.png")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--ks", default="1,4,16,64")
    parser.add_argument("--ms", default="1,2,4,7,13,26")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    model, batch = load_problem(args.model, pretrained=args.model == "minilm")
    result = run(
        model,
        batch,
        [int(x) for x in args.ks.split(",")],
        [int(x) for x in args.ms.split(",")],
        args.repeats,
        seed=args.seed,
    )
    result["model"] = args.model
    result["seconds"] = round(time.perf_counter() - t0, 1)
    with open(os.path.join(args.out, "fidelity.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(args.out, "fidelity.png"))
    print(
        f"{args.model}: {result['trainable_params']} trainable, {result['num_units']} units, "
        f"{args.repeats} repeats, {result['seconds']} s"
    )
    print(markdown(result))


if __name__ == "__main__":
    main()
