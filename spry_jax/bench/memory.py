"""Peak memory of one client step, per model and method, from XLA's memory analysis.

One client step is what :func:`spry_jax.core.client.make_client_update` runs for one batch:
the method's gradient estimator and the client optimizer's update (optimizer state created
fresh, as every round). It is lowered with ``jax.ShapeDtypeStruct`` arguments (no weights are
ever materialised, so Llama2-7B and OPT-13B are measured from their configs alone), compiled,
and read with ``compiled.memory_analysis()`` (arguments, temporaries and outputs
less what the outputs alias)::

    peak = arguments + temp + outputs - aliased

The CPU scheduler is XLA's memory-optimising one (the command line, :func:`main`, adds
``--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED`` when ``XLA_FLAGS`` names no
scheduler; importing this module changes no flag; the flags are printed and stored in every
row) and compute is float32. Each row also carries a *floor*: frozen weights
+ trainable weights + optimizer state + the batch + twice the largest single activation of one
layer (primal and tangent of a forward-mode pass), the least any method could need.

``--validate=minilm`` checks the estimate against real resident memory: a fresh process loads
the real MiniLM weights, compiles the same step, and the rise of its peak RSS (``VmHWM``, reset
through ``/proc/self/clear_refs``) while the step runs is compared with temp + outputs.

    python -m spry_jax.bench.memory --models=roberta-large,llama2-7b \\
        --methods=spry,fedavg,fedavg_remat,fedavg_mesp --out=/tmp/memory.json
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from spry_jax import config as config_lib  # noqa: E402
from spry_jax import memory as memory_lib  # noqa: E402
from spry_jax import methods, models, tasks  # noqa: E402
from spry_jax.bench import MEMORY_SCHEDULER_FLAG, run_row, use_memory_scheduler  # noqa: E402
from spry_jax.core import client as client_lib  # noqa: E402
from spry_jax.core import estimators  # noqa: E402
from spry_jax.models import peft as peft_lib  # noqa: E402
from spry_jax.types import SplitModel  # noqa: E402

GiB = 2**30
MiB = 2**20


@dataclasses.dataclass(frozen=True)
class Setting:
    """The paper's training setting for a model (the paper's experimental setup, Panchal et al., NeurIPS 2024, arXiv 2405.15551).

    Attributes:
      task: "classification" or "qa" (SQuAD v2 for the OPT models).
      seq: max sequence length (64; 384 for QA).
      quant: frozen-base storage: "none" (float32) or "int4"/"int8" (the 4-bit GPTQ runs).
      num_labels: classes for classification.
      batch: local batch size.
    """

    task: str = "classification"
    seq: int = 64
    quant: str = "none"
    num_labels: int = 2
    batch: int = 8


PAPER_SETTINGS: dict[str, Setting] = {
    "roberta-large": Setting(num_labels=4),  # AG News
    "bert-large": Setting(num_labels=3),  # SNLI / MNLI
    "distilbert-base": Setting(num_labels=2),  # SST-2
    "albert-large": Setting(num_labels=2),  # Yelp
    "llama2-7b": Setting(quant="int4", num_labels=2),  # MultiRC, 4-bit base, fp32 compute
    "opt-6.7b": Setting(task="qa", seq=384, quant="int4"),  # SQuAD v2
    "opt-13b": Setting(task="qa", seq=384, quant="int4"),  # SQuAD v2
    "minilm": Setting(),
    "tiny-bert": Setting(seq=16),
}

# Paper Table/Fig. memory (GB) where it gives both numbers (the paper's abstract: Llama2-7B 33.9 -> 6.2 GB, OPT-13B 76.5 -> 10.8 GB).
PAPER_GB = {
    "llama2-7b": {"fedavg": 33.9, "spry": 6.2},
    "opt-13b": {"fedavg": 76.5, "spry": 10.8},
}

DEFAULT_MODELS = "distilbert-base,roberta-large,llama2-7b"
DEFAULT_METHODS = "spry,fedfgd,fedavg,fedavg_remat,fedavg_mesp,fedavg_lcsb,fedmezo"


def setting_for(
    name: str, batch: int | None = None, seq: int | None = None, quant: str | None = None
) -> Setting:
    """The paper's setting for ``name`` (classification, batch 8, seq 64 for unknown names);
    ``batch``, ``seq`` and ``quant`` override it when given."""
    s = PAPER_SETTINGS.get(name, Setting())
    return dataclasses.replace(s, batch=batch or s.batch, seq=seq or s.seq, quant=quant or s.quant)


def abstract_split_model(
    name: str,
    setting: Setting,
    *,
    dropout: float = 0.1,
    overrides: dict[str, Any] | None = None,
    remat: str = "none",
    lazy_dequant: bool = False,
    cut_cotangents: bool = False,
    dtype: str = "float32",
) -> SplitModel:
    """A :class:`SplitModel` whose ``trainable`` and ``frozen`` are ``jax.ShapeDtypeStruct``.

    The model is built, adapted (LoRA r=1, alpha=1 on query/value) and split inside
    ``jax.eval_shape``, so no weight is allocated; ``apply_fn`` keeps only the graph and leaf
    shapes, and is called on real or abstract arrays alike. ``remat``, ``lazy_dequant`` and ``cut_cotangents`` are
    the build options of :func:`spry_jax.models.make_split_model` (a method's come from
    :func:`spry_jax.methods.model_options`); ``dtype`` is ``model.dtype`` (frozen float weights
    and activations; the trainable leaves stay float32).
    """
    peft_cfg = dict(
        method="lora", lora_rank=1, lora_alpha=1.0, lora_dropout=dropout, target_modules=[]
    )
    config = models.load_config(name, overrides, dropout=dropout, prefer_registry=True)
    holder: dict[str, SplitModel] = {}

    def build():
        model = models.build_model(
            config,
            task=setting.task,
            num_labels=setting.num_labels,
            dtype=dtype,
            quant=setting.quant,
        )
        models.apply_peft(model, peft_cfg)
        models.set_build_options(
            model, remat=remat, lazy_dequant=lazy_dequant, cut_cotangents=cut_cotangents
        )
        split = peft_lib.split_model(model, peft_cfg)
        holder["split"] = split
        return split.trainable, split.frozen

    trainable, frozen = jax.eval_shape(build)
    return dataclasses.replace(holder["split"], trainable=trainable, frozen=frozen)


def method_config(method: str, num_tangents: int = 1):
    """The default config with ``method`` set (the method's own estimator and optimizers)."""
    cfg = config_lib.default_config()
    cfg.method = method
    cfg.fwd.num_tangents = num_tangents
    return cfg


SCOPES = ("client_step", "estimator")


def client_step_fn(
    model: SplitModel,
    method: str,
    num_tangents: int = 1,
    scope: str = "client_step",
    dropout_bits: str = "hash",
):
    """``step(params, frozen, mask, batches, step_mask, key, inputs)``.

    ``model`` must be built with ``method``'s options (:func:`spry_jax.methods.model_options`;
    :func:`analyse` and :func:`measure_rss` do): MeBP's checkpoints, MeSP's recompute and the
    lazy dequantisation of a quantised base are part of the model, not of the estimator.
    ``scope="client_step"``: the method's client update (:func:`make_client_update`, the
    program a round runs) on one local step -- estimator and client optimizer, -> ClientResult.
    ``scope="estimator"``: the gradient estimator alone on the batch -> Estimate (the loss and
    the gradient estimate, e.g. one ``jvp`` for Spry, ``value_and_grad`` for FedAvg).
    ``dropout_bits``: how the dropout masks are drawn (``model.dropout_bits``).
    """
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}; choose one of {SCOPES}.")
    parts = methods.build_round_parts(method_config(method, num_tangents))
    loss_fn = tasks.make_loss_fn(model, dropout_bits)
    if scope == "client_step":
        return client_lib.make_client_update(loss_fn, parts.estimator, parts.client_optimizer)

    def estimate(params, frozen, mask, batches, step_mask, key, inputs):
        del step_mask
        batch = jax.tree.map(lambda x: x[0], batches)
        return client_lib.estimate_step(
            parts.estimator, loss_fn, params, frozen, mask, batch, key, 0, inputs
        )

    return estimate


def _sds(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def batch_shapes(task: str, batch: int, seq: int) -> dict[str, jax.ShapeDtypeStruct]:
    """One local step's batch, ``[steps=1, batch, ...]``, as in a packed round."""
    out = {
        "input_ids": _sds((1, batch, seq), jnp.int32),
        "attention_mask": _sds((1, batch, seq), jnp.int32),
        "example_mask": _sds((1, batch), jnp.float32),
    }
    if task == "qa":
        out["start_positions"] = _sds((1, batch), jnp.int32)
        out["end_positions"] = _sds((1, batch), jnp.int32)
    elif task == "causal_lm":
        out["labels"] = _sds((1, batch, seq), jnp.int32)
    else:
        out["labels"] = _sds((1, batch), jnp.int32)
    return out


def step_arguments(model: SplitModel, setting: Setting) -> tuple:
    """Abstract arguments of one client step (mask: one 0/1 scalar per leaf, as in a round).

    The masks are runtime values, so Spry's program (any client's slice) and FedFGD's are the
    same program; the memory of a step does not depend on which units a client holds."""
    mask = {k: _sds((), jnp.float32) for k in model.trainable}
    inputs = estimators.EstimatorInputs(step=_sds((), jnp.int32), guide=dict(model.trainable))
    return (
        model.trainable,
        model.frozen,
        mask,
        batch_shapes(model.task, setting.batch, setting.seq),
        _sds((1,), jnp.float32),
        _sds((2,), jnp.uint32),
        inputs,
    )


def _nbytes(tree) -> int:
    return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def largest_activation_bytes(name: str, setting: Setting) -> int:
    """The largest single float32 intermediate of one layer: the FFN hidden ``[b, s, ffn]``,
    the attention scores ``[b, heads, s, s]``, the vocabulary logits (causal LM) and, for a
    quantised base, the largest dequantised kernel ``[in, out]`` (a per-layer temporary)."""
    c = models.load_config(name, prefer_registry=True)
    b, s = setting.batch, setting.seq
    hidden = getattr(c, "hidden_size", None) or c.dim
    ffn = (
        getattr(c, "intermediate_size", None)
        or getattr(c, "ffn_dim", None)
        or getattr(c, "hidden_dim", None)
    )
    heads = getattr(c, "num_attention_heads", None) or c.n_heads
    sizes = [b * s * ffn, b * heads * s * s, b * s * hidden]
    if setting.task == "causal_lm":
        sizes.append(b * s * c.vocab_size)
    if setting.quant != "none":
        sizes.append(hidden * ffn)
    return 4 * max(sizes)


def analyse(
    name: str,
    method: str,
    *,
    batch: int | None = None,
    seq: int | None = None,
    num_tangents: int = 1,
    quant: str | None = None,
    scope: str = "client_step",
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Lowers and compiles one client step of ``method`` on ``name`` and returns its row.

    Args:
      name: a model registry name (its paper setting applies, see :data:`PAPER_SETTINGS`).
      method: a row of :data:`spry_jax.methods.METHODS`.
      batch, seq, quant: override the paper's batch size, sequence length and base storage.
      num_tangents: K for forward-gradient methods.
      scope: "client_step" (the round's client update, one step) or "estimator" (the
        gradient estimate alone), see :func:`client_step_fn`.
      overrides: HF-config overrides (e.g. fewer layers, for tests).
    """
    setting = setting_for(name, batch, seq, quant)
    model = abstract_split_model(
        name, setting, overrides=overrides, **methods.model_options(method)
    )
    step = client_step_fn(model, method, num_tangents, scope)
    args = step_arguments(model, setting)
    t0 = time.perf_counter()
    lowered = jax.jit(step).lower(*args)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    sizes = memory_lib.peak_bytes(compiled)
    peak = sizes["peak_bytes"]
    frozen_b = _nbytes(model.frozen)
    trainable_b = _nbytes(model.trainable)
    opt_b = _nbytes(jax.eval_shape(client_step_opt_init(method), model.trainable))
    batch_b = _nbytes(args[3])
    act_b = largest_activation_bytes(name, setting)
    floor = frozen_b + trainable_b + opt_b + batch_b + 2 * act_b
    return dict(
        model=name,
        method=method,
        scope=scope,
        estimator=methods.get_method(method).estimator,
        remat=methods.get_method(method).remat,
        task=setting.task,
        batch=setting.batch,
        seq=setting.seq,
        num_tangents=num_tangents,
        base_dtype=setting.quant if setting.quant != "none" else "float32",
        compute_dtype="float32",
        **sizes,
        floor_bytes=int(floor),
        peak_over_floor=peak / floor,
        frozen_bytes=frozen_b,
        trainable_bytes=trainable_b,
        trainable_params=int(sum(math.prod(x.shape) for x in model.trainable.values())),
        optimizer_bytes=opt_b,
        largest_activation_bytes=act_b,
        lower_s=round(lower_s, 2),
        compile_s=round(compile_s, 2),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        platform=jax.devices()[0].platform,
    )


def client_step_opt_init(method: str):
    """The client optimizer's ``init`` (its state is part of the floor)."""
    return methods.build_round_parts(method_config(method)).client_optimizer.init


# ----------------------------------------------------------------------------------------
# Validation against resident memory on a real model.
# ----------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def real_step_arguments(model: SplitModel, batches: dict[str, Any]) -> tuple:
    """Concrete arguments of one client step (:func:`client_step_fn`) on ``batches``
    (``[steps=1, batch, ...]``): every leaf in the client's slice, one real step, key 0."""
    return (
        model.trainable,
        model.frozen,
        {k: jnp.ones((), jnp.float32) for k in model.trainable},
        batches,
        jnp.ones((1,), jnp.float32),
        jax.random.PRNGKey(0),
        estimators.EstimatorInputs(step=jnp.zeros((), jnp.int32), guide=model.trainable),
    )


def measure_rss(name: str, method: str, batch: int = 8, seq: int = 64) -> dict[str, Any]:
    """Runs one real client step (real weights) and measures the rise of peak RSS over the
    resident memory just before it; call it in a fresh process (see :func:`validate`)."""
    setting = setting_for(name, batch, seq)
    model_cfg = dict(
        name=name, pretrained=name == "minilm", dtype="float32", quant=setting.quant, dropout=0.1
    )
    peft_cfg = dict(method="lora", lora_rank=1, lora_alpha=1.0, lora_dropout=0.1, target_modules=[])
    model = models.make_split_model(
        model_cfg,
        peft_cfg,
        task=setting.task,
        num_labels=setting.num_labels,
        **methods.model_options(method),
    )
    step = client_step_fn(model, method)
    shapes = step_arguments(model, setting)
    rng = np.random.default_rng(0)
    vocab = models.load_config(name, prefer_registry=True).vocab_size
    batches = {
        k: jnp.asarray(
            rng.integers(1000, vocab, v.shape)
            if k == "input_ids"
            else (rng.integers(0, 2, v.shape) if k != "example_mask" else np.ones(v.shape)),
            v.dtype,
        )
        for k, v in shapes[3].items()
    }
    batches["attention_mask"] = jnp.ones_like(batches["attention_mask"])
    args = real_step_arguments(model, batches)
    compiled = jax.jit(step).lower(*args).compile()
    sizes = memory_lib.peak_bytes(compiled)
    jax.block_until_ready(args)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    out = compiled(*args)
    jax.block_until_ready(out)
    hwm = _status_kib("VmHWM")
    estimate = sizes["peak_bytes"] - sizes["argument_bytes"]  # temp + outputs - aliased
    return dict(
        model=name,
        method=method,
        batch=batch,
        seq=seq,
        rss_delta_bytes=(hwm - before) * 1024,
        estimate_bytes=int(estimate),
        ratio=(hwm - before) * 1024 / estimate,
    )


def validate(name: str, method_names: list[str], batch: int = 8, seq: int = 64) -> list[dict]:
    """:func:`measure_rss` for each method, each in a fresh interpreter (clean allocator).

    ``MALLOC_MMAP_THRESHOLD_`` makes glibc map every large buffer fresh (and unmap it on
    free), so memory freed by the compiler is not silently reused by the step."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_cpu_scheduler_type" not in flags:
        flags = f"{flags} {MEMORY_SCHEDULER_FLAG}".strip()
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", XLA_FLAGS=flags)
    rows = []
    for method in method_names:
        code = (
            "import json, spry_jax.bench.memory as m; "
            f"print('ROW ' + json.dumps(m.measure_rss({name!r}, {method!r}, {batch}, {seq})))"
        )
        rows.append(run_row(code, env, f"RSS measurement of {name}/{method}"))
    return rows


# ----------------------------------------------------------------------------------------
# CLI.
# ----------------------------------------------------------------------------------------


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows as a markdown table with each method's ratio to fedavg of the same model."""
    base = {(r["model"], r["scope"]): r["peak_bytes"] for r in rows if r["method"] == "fedavg"}
    lines = [
        "| model | scope | method | base | batch x seq | peak (MiB) | args | temp | floor (MiB) | "
        "peak / floor | fedavg / method | lower+compile (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = base.get((r["model"], r["scope"]))
        ratio_s = f"{ratio / r['peak_bytes']:.2f}x" if ratio else "-"
        lines.append(
            f"| {r['model']} | {r['scope']} | {r['method']} | {r['base_dtype']} | {r['batch']} x {r['seq']} | "
            f"{r['peak_bytes'] / MiB:.1f} | {r['argument_bytes'] / MiB:.1f} | "
            f"{r['temp_bytes'] / MiB:.1f} | {r['floor_bytes'] / MiB:.1f} | "
            f"{r['peak_over_floor']:.2f} | {ratio_s} | {r['lower_s'] + r['compile_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    xla_flags = use_memory_scheduler()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated model names")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated methods")
    parser.add_argument("--batch", type=int, default=None, help="default: the paper's (8)")
    parser.add_argument("--seq", type=int, default=None, help="default: the paper's (64/384)")
    parser.add_argument("--quant", default=None, help="base storage override: none|int8|int4")
    parser.add_argument("--num_tangents", type=int, default=1)
    parser.add_argument(
        "--scopes", default="client_step", help=f"comma list of {SCOPES} (each a row)"
    )
    parser.add_argument("--out", default="", help="JSON file for the rows")
    parser.add_argument(
        "--validate",
        default="minilm",
        help="model to check against real RSS ('' to skip); runs the real step",
    )
    parser.add_argument("--validate_methods", default="spry,fedavg")
    args = parser.parse_args(argv)
    method_names = [m for m in args.methods.split(",") if m]
    for m in method_names:
        methods.get_method(m)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; XLA_FLAGS={xla_flags}")
    rows = []
    scopes = [x for x in args.scopes.split(",") if x]
    for name, scope, method in (
        (n, sc, m) for n in args.models.split(",") if n for sc in scopes for m in method_names
    ):
        row = analyse(
            name,
            method,
            batch=args.batch,
            seq=args.seq,
            quant=args.quant,
            scope=scope,
            num_tangents=args.num_tangents,
        )
        print(
            f"{name:16s} {scope:11s} {method:14s} peak {row['peak_bytes'] / GiB:8.3f} GiB "
            f"(floor {row['floor_bytes'] / GiB:.3f})  lower {row['lower_s']:.1f}s "
            f"compile {row['compile_s']:.1f}s",
            flush=True,
        )
        rows.append(row)
    print()
    print(markdown_table(rows))
    result: dict[str, Any] = {"rows": rows}
    if args.validate:
        checks = validate(args.validate, [m for m in args.validate_methods.split(",") if m])
        print(f"\nValidation on real {args.validate} (RSS rise while the step runs):")
        print("| model | method | estimate temp+out (MiB) | RSS rise (MiB) | RSS / estimate |")
        print("|---|---|---|---|---|")
        for c in checks:
            print(
                f"| {c['model']} | {c['method']} | {c['estimate_bytes'] / 2**20:.1f} | "
                f"{c['rss_delta_bytes'] / 2**20:.1f} | {c['ratio']:.2f} |"
            )
        result["validation"] = checks
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
        if args.validate:
            with open(os.path.splitext(args.out)[0] + ".validation.json", "w") as f:
                json.dump(result["validation"], f, indent=1)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
