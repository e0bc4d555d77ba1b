"""Benchmark forward, jvp and backprop steps of LoRA models: time and XLA peak memory ratios.

For each model (the real MiniLM asset and a BERT-base-shaped random model) with LoRA r=1 on
query/value and a classification head, at the paper's batch 8 x 64 tokens:

* step time (median over ``--iters`` runs after a compiled warm-up; compile time separately) of
  - forward: the loss,
  - jvp: the loss and its directional derivative along one tangent (Spry's estimator, K=1),
  - backprop: the loss and its gradient w.r.t. the LoRA/head weights;
* XLA peak memory of each compiled step (:func:`spry_jax.memory.peak_bytes`: arguments +
  temp + outputs - aliased), with XLA's memory-optimising CPU scheduler (set by ``main``);
* our jitted forward against transformers' PyTorch forward of the same model on the same CPU.

Times on shared machines are noisy: read the ratios, measured in one run. Run::

    python scripts/bench_models.py
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from spry_jax import models  # noqa: E402
from spry_jax.bench import use_memory_scheduler  # noqa: E402
from spry_jax.memory import peak_bytes  # noqa: E402


def _time(fn, args, iters: int) -> tuple[float, float, object]:
    """(compile seconds, median step seconds, the compiled step)."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
    return compile_s, statistics.median(times), compiled


def _torch_forward_seconds(name: str, config, ids, mask, iters: int) -> float:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    transformers.logging.set_verbosity_error()
    if name == "minilm":
        from spry_jax import assets

        tm = transformers.BertForSequenceClassification.from_pretrained(
            str(assets.fetch("minilm")), num_labels=2
        )
    else:
        tm = transformers.BertForSequenceClassification(config)
    tm.eval()
    ti, tmask = torch.tensor(np.asarray(ids)), torch.tensor(np.asarray(mask))
    with torch.no_grad():
        tm(ti, attention_mask=tmask)
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            tm(ti, attention_mask=tmask)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench(name: str, pretrained: bool, batch: int, seq: int, iters: int) -> None:
    model_cfg = ml_collections.ConfigDict(
        dict(
            name=name,
            pretrained=pretrained,
            dtype="float32",
            quant="none",
            dropout=0.0,
            overrides={},
            pooling="default",
        )
    )
    peft_cfg = dict(method="lora", lora_rank=1, lora_alpha=1.0, lora_dropout=0.0, target_modules=[])
    split = models.make_split_model(model_cfg, peft_cfg, task="classification", num_labels=2)
    # Backprop through the build the backprop rows use (methods.model_options("fedavg")).
    reverse = models.make_split_model(
        model_cfg, peft_cfg, task="classification", num_labels=2, cut_cotangents=True
    )
    config = models.load_config(name, prefer_registry=not pretrained)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1000, config.vocab_size, (batch, seq)), jnp.int32)
    mask = jnp.ones((batch, seq), jnp.int32)
    labels = jnp.asarray(rng.integers(0, 2, (batch,)), jnp.int32)

    def loss_fn(tr, frozen, apply_fn=split.apply_fn):
        logits = apply_fn(tr, frozen, ids, mask)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

    def fwd(tr, frozen, v):
        return loss_fn(tr, frozen)

    def jvp(tr, frozen, v):
        return jax.jvp(lambda t: loss_fn(t, frozen), (tr,), (v,))

    def backprop(tr, frozen, v):
        return jax.value_and_grad(functools.partial(loss_fn, apply_fn=reverse.apply_fn))(tr, frozen)

    tangent = jax.tree.map(lambda x: jnp.ones_like(x), split.trainable)
    args = (split.trainable, split.frozen, tangent)
    n_train = sum(int(x.size) for x in split.trainable.values())
    n_frozen = sum(int(x.size) for x in jax.tree.leaves(split.frozen))
    print(
        f"\n== {name} ({'pretrained' if pretrained else 'random init'}): "
        f"{n_frozen / 1e6:.1f} M frozen, {n_train} trainable (LoRA r=1 + head), "
        f"batch {batch} x {seq} tokens, float32"
    )
    rows = {}
    for label, fn in (("forward", fwd), ("jvp", jvp), ("backprop", backprop)):
        compile_s, step_s, compiled = _time(fn, args, iters)
        rows[label] = (compile_s, step_s, peak_bytes(compiled)["peak_bytes"])
        print(
            f"  {label:9s} compile {compile_s:6.2f} s   step {step_s * 1e3:8.2f} ms   "
            f"XLA peak {rows[label][2] / 2**20:8.1f} MiB"
        )
    f_step, f_mem = rows["forward"][1], rows["forward"][2]
    for label in ("jvp", "backprop"):
        print(
            f"  ratio {label}/forward: time {rows[label][1] / f_step:.2f}x   "
            f"peak memory {rows[label][2] / f_mem:.2f}x"
        )
    print(
        f"  ratio backprop/jvp: time {rows['backprop'][1] / rows['jvp'][1]:.2f}x   "
        f"peak memory {rows['backprop'][2] / rows['jvp'][2]:.2f}x"
    )
    fwd_logits = jax.jit(lambda tr, fr: split.apply_fn(tr, fr, ids, mask))
    _, ours_s, _ = _time(fwd_logits, (split.trainable, split.frozen), iters)
    torch_s = _torch_forward_seconds(name, config, ids, mask, iters)
    print(
        f"  forward (logits) ours {ours_s * 1e3:.2f} ms vs transformers PyTorch "
        f"{torch_s * 1e3:.2f} ms: ratio ours/torch {ours_s / torch_s:.2f}x"
    )


def main() -> None:
    xla_flags = use_memory_scheduler()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument(
        "--models",
        default="minilm,bert-base",
        help="comma list; minilm is pretrained, others random from the registry",
    )
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; XLA_FLAGS={xla_flags}")
    for name in args.models.split(","):
        bench(name, name == "minilm", args.batch, args.seq, args.iters)


if __name__ == "__main__":
    main()
