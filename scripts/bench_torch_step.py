"""One client step, ours against PyTorch's: Spry (one jvp) and backprop, each in its own process.

The setting of the paper's client (REFERENCE.md §2): batch 8 x 64 tokens, LoRA r = 1, alpha = 1
on every layer's query and value, a trainable classification head, model and LoRA dropout 0.1
(training mode), K = 1 tangent, AdamW (lr 1e-4, weight decay 0.01). Sides:

* ``jax`` -- our client update for one local step, the program a round runs
  (:func:`spry_jax.bench.memory.client_step_fn`: the method's estimator, a fresh AdamW and the
  masked update), jitted; its FLOPs from XLA's cost analysis.
* ``torch`` -- transformers' PyTorch ``BertForSequenceClassification`` with the same LoRA
  (written here: ``x @ A @ B * alpha / r`` on the dropped-out input, A ~ PEFT's kaiming-uniform,
  B = 0), in training mode. Spry is the original release's step: ``torch.func.jvp`` of a
  ``functional_call`` over the trainable tensors under ``no_grad``, ``grad = jvp * tangent``,
  then ``torch.optim.AdamW``. Backprop is ``loss.backward()``, ``AdamW.step()``,
  ``zero_grad()``.

Each (side, model, method) runs in a fresh interpreter pinned to the same CPUs with the same
thread count (``torch.set_num_threads``; XLA's CPU pool takes the pinned cores), so neither side
inherits the other's warm caches or threads. Reported: the median step time over ``--iters``
steps after warm-up steps (XLA's compile separately), and the ratios ours / PyTorch and ours
Spry / ours backprop. Times on a shared machine are noisy: read the ratios of one run and the
load average printed beside them.

    python scripts/bench_torch_step.py --models=minilm,bert-base --methods=spry,fedavg

A script, not part of the package: the package never imports torch (tests/test_light_install.py).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from spry_jax.bench import run_row  # noqa: E402

# Our method row -> what the PyTorch side runs.
METHODS = {"spry": "jvp", "fedavg": "backprop"}
SIDES = ("jax", "torch")
LR, WEIGHT_DECAY, DROPOUT, RANK, ALPHA = 1e-4, 0.01, 0.1, 1, 1.0


def batch_arrays(vocab_size: int, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The step's batch (token ids above the special tokens, every position attended, labels
    of both classes): the same arrays on both sides."""
    rng = np.random.default_rng(seed)
    return {
        "input_ids": rng.integers(min(1000, vocab_size // 2), vocab_size, (batch, seq)).astype(
            np.int32
        ),
        "attention_mask": np.ones((batch, seq), np.int32),
        "labels": rng.integers(0, 2, (batch,)).astype(np.int32),
    }


def _timed(step, warmup: int, iters: int, sync) -> list[float]:
    for _ in range(warmup):
        sync(step())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sync(step())
        times.append(time.perf_counter() - t0)
    return times


# ---------------------------------------------------------------------------------------------
# Our side.


def jax_row(name: str, method: str, batch: int, seq: int, warmup: int, iters: int) -> dict:
    """Our jitted client update (one local step) for ``method``: compile s, step times, FLOPs."""
    import jax
    import jax.numpy as jnp

    from spry_jax import methods, models
    from spry_jax.bench import memory as bench_memory
    from spry_jax.memory import flops

    model = models.make_split_model(
        dict(name=name, pretrained=name == "minilm", dtype="float32", dropout=DROPOUT),
        dict(
            method="lora",
            lora_rank=RANK,
            lora_alpha=ALPHA,
            lora_dropout=DROPOUT,
            target_modules=[],
        ),
        task="classification",
        num_labels=2,
        **methods.model_options(method),
    )
    step = bench_memory.client_step_fn(model, method)
    arrays = batch_arrays(models.load_config(name, prefer_registry=True).vocab_size, batch, seq)
    batches = {k: jnp.asarray(v)[None] for k, v in arrays.items()}
    batches["example_mask"] = jnp.ones((1, batch), jnp.float32)
    args = bench_memory.real_step_arguments(model, batches)
    t0 = time.perf_counter()
    compiled = jax.jit(step).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    times = _timed(lambda: compiled(*args), warmup, iters, jax.block_until_ready)
    return dict(
        compile_s=compile_s,
        times_s=times,
        flops=flops(compiled),
        trainable=int(sum(x.size for x in model.trainable.values())),
    )


# ---------------------------------------------------------------------------------------------
# PyTorch side.


def torch_lora_model(name: str, num_labels: int = 2, seed: int = 0):
    """transformers' ``BertForSequenceClassification`` (MiniLM's real weights, or the registry
    shape at random init) with LoRA on every query/value Linear; only LoRA and the classifier
    are trainable. Returns ``(model, trainable: dict name -> Parameter)``."""
    import math

    import torch
    import transformers

    from spry_jax import models

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    if name == "minilm":
        from spry_jax import assets

        tm = transformers.BertForSequenceClassification.from_pretrained(
            str(assets.fetch("minilm")),
            num_labels=num_labels,
            hidden_dropout_prob=DROPOUT,
            attention_probs_dropout_prob=DROPOUT,
        )
    else:
        config = models.load_config(name, prefer_registry=True, dropout=DROPOUT)
        config.num_labels = num_labels
        tm = transformers.BertForSequenceClassification(config)

    class LoRALinear(torch.nn.Module):
        def __init__(self, base: torch.nn.Linear):
            super().__init__()
            self.base = base
            self.drop = torch.nn.Dropout(DROPOUT)
            bound = 1.0 / math.sqrt(base.in_features)  # PEFT's kaiming_uniform(a=sqrt(5))
            self.lora_a = torch.nn.Parameter(
                torch.empty(base.in_features, RANK).uniform_(-bound, bound)
            )
            self.lora_b = torch.nn.Parameter(torch.zeros(RANK, base.out_features))

        def forward(self, x):
            return self.base(x) + (self.drop(x) @ self.lora_a @ self.lora_b) * (ALPHA / RANK)

    for p in tm.parameters():
        p.requires_grad_(False)
    for layer in tm.bert.encoder.layer:
        att = layer.attention.self
        att.query = LoRALinear(att.query)
        att.value = LoRALinear(att.value)
    for p in tm.classifier.parameters():
        p.requires_grad_(True)
    tm.train()
    trainable = {n: p for n, p in tm.named_parameters() if p.requires_grad}
    return tm, trainable


def torch_row(
    name: str, method: str, batch: int, seq: int, warmup: int, iters: int, threads: int
) -> dict:
    """PyTorch's step for ``method``: the release's jvp step (Spry) or loss.backward (FedAvg)."""
    import torch
    import torch.nn.functional as F

    from spry_jax import models

    torch.set_num_threads(threads)
    tm, trainable = torch_lora_model(name)
    arrays = batch_arrays(models.load_config(name, prefer_registry=True).vocab_size, batch, seq)
    ids = torch.tensor(arrays["input_ids"], dtype=torch.long)
    mask = torch.tensor(arrays["attention_mask"], dtype=torch.long)
    labels = torch.tensor(arrays["labels"], dtype=torch.long)
    opt = torch.optim.AdamW(list(trainable.values()), lr=LR, weight_decay=WEIGHT_DECAY)

    if METHODS[method] == "jvp":

        def loss_of(params):
            out = torch.func.functional_call(
                tm, params, (ids,), {"attention_mask": mask}, strict=False
            )
            return F.cross_entropy(out.logits, labels)

        def step():
            with torch.no_grad():
                primals = {n: p.detach() for n, p in trainable.items()}
                tangents = {n: torch.randn_like(p) for n, p in primals.items()}
                loss, jvp = torch.func.jvp(loss_of, (primals,), (tangents,))
                for n, p in trainable.items():
                    p.grad = jvp * tangents[n]
            opt.step()
            return loss

    else:

        def step():
            loss = F.cross_entropy(tm(ids, attention_mask=mask).logits, labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

    times = _timed(step, warmup, iters, lambda loss: float(loss))
    return dict(
        compile_s=0.0,
        times_s=times,
        flops=float("nan"),
        trainable=int(sum(p.numel() for p in trainable.values())),
        torch_threads=torch.get_num_threads(),
        attention=getattr(tm.config, "_attn_implementation", "?"),
    )


# ---------------------------------------------------------------------------------------------
# The driver: one fresh process per (side, model, method).


def row(side: str, name: str, method: str, batch: int, seq: int, warmup: int, iters: int) -> dict:
    """One measurement in this process (call it in a fresh one: :func:`measure`)."""
    if side not in SIDES:
        raise ValueError(f"side={side!r}; choose one of {SIDES}")
    if method not in METHODS:
        raise ValueError(f"method={method!r}; choose one of {sorted(METHODS)}")
    threads = len(os.sched_getaffinity(0))
    if side == "jax":
        out = jax_row(name, method, batch, seq, warmup, iters)
    else:
        out = torch_row(name, method, batch, seq, warmup, iters, threads)
    out.update(
        side=side,
        model=name,
        method=method,
        batch=batch,
        seq=seq,
        cpus=sorted(os.sched_getaffinity(0)),
        step_s=statistics.median(out["times_s"]),
    )
    return out


def measure(
    side: str,
    name: str,
    method: str,
    *,
    batch: int = 8,
    seq: int = 64,
    warmup: int = 3,
    iters: int = 20,
    cpus: str = "",
) -> dict:
    """:func:`row` in a fresh interpreter, pinned to ``cpus`` (e.g. "0,1"; "" = all)."""
    pin = f"os.sched_setaffinity(0, {{{cpus}}}); " if cpus else ""
    here = str(pathlib.Path(__file__).resolve().parent)
    code = (
        f"import os, sys; {pin}sys.path.insert(0, {here!r}); import json, bench_torch_step as s; "
        f"r = s.row({side!r}, {name!r}, {method!r}, {batch}, {seq}, {warmup}, {iters}); "
        "print('ROW ' + json.dumps(r))"
    )
    return run_row(code, dict(os.environ), f"{side} {name} {method} step")


def ratios(rows: list[dict]) -> list[dict[str, Any]]:
    """Per model: ours / PyTorch for each method, and ours Spry / ours backprop."""
    by = {(r["side"], r["model"], r["method"]): r["step_s"] for r in rows}
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        entry: dict[str, Any] = {"model": model}
        for method in METHODS:
            jax_s, torch_s = by.get(("jax", model, method)), by.get(("torch", model, method))
            if jax_s and torch_s:
                entry[f"{method}_ours_over_torch"] = jax_s / torch_s
        if by.get(("jax", model, "spry")) and by.get(("jax", model, "fedavg")):
            entry["spry_over_backprop_ours"] = (
                by[("jax", model, "spry")] / by[("jax", model, "fedavg")]
            )
        out.append(entry)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,bert-base")
    parser.add_argument("--methods", default="spry,fedavg")
    parser.add_argument("--sides", default="jax,torch")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--cpus", default="", help="pin every row to these CPUs, e.g. '0,1'")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    import jax
    import torch

    print(
        f"jax {jax.__version__}, torch {torch.__version__}; {os.cpu_count()} CPU cores, rows "
        f"pinned to {args.cpus or 'all'}; load average {os.getloadavg()}",
        flush=True,
    )
    rows = []
    print("\n| model | method | side | step (ms) | spread min-max (ms) | compile (s) | GFLOP |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for method in args.methods.split(","):
            for side in args.sides.split(","):
                r = measure(
                    side,
                    name,
                    method,
                    batch=args.batch,
                    seq=args.seq,
                    warmup=args.warmup,
                    iters=args.iters,
                    cpus=args.cpus,
                )
                rows.append(r)
                print(
                    f"| {name} | {method} | {side} | {r['step_s'] * 1e3:.1f} | "
                    f"{min(r['times_s']) * 1e3:.1f}-{max(r['times_s']) * 1e3:.1f} | "
                    f"{r['compile_s']:.1f} | {r['flops'] / 1e9:.2f} |",
                    flush=True,
                )
    print(
        "\n| model | Spry ours / release (PyTorch jvp) | backprop ours / PyTorch | "
        "ours Spry / ours backprop |"
    )
    print("|---|---|---|---|")
    table = ratios(rows)
    for t in table:
        cells = [
            t.get(k)
            for k in ("spry_ours_over_torch", "fedavg_ours_over_torch", "spry_over_backprop_ours")
        ]
        print(
            f"| {t['model']} | "
            + " | ".join("-" if c is None else f"{c:.2f}x" for c in cells)
            + " |"
        )
    print(f"\nload average at the end {os.getloadavg()}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "ratios": table, "argv": sys.argv}, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
