"""PEFT as configuration: LoRA, IA3, BitFit and head-only, and the split into trainable/frozen.

A method adds trainable leaves to the :class:`~spry_jax.models.layers.Linear` modules that its
target patterns select, and the trainable set is a *filter* over state paths:

* ``lora``: ``nnx.LoRAParam`` A ``[in, r]`` and B ``[r, out]`` on the family's default targets
  (query/value; q_lin/v_lin for DistilBERT; q_proj/v_proj for decoders) or on
  ``target_modules`` (regexes searched in the Linear's state path). B = 0 at the start.
* ``ia3``: an :class:`~spry_jax.models.layers.IA3Param` vector of ones that scales the output of
  the family's ``IA3_TARGETS`` and the input of its ``IA3_FEEDFORWARD`` layers (the (IA)^3
  design: keys, values and the FFN's inner activation). PEFT's BERT mapping also catches the
  attention output dense through its ``output.dense`` suffix; we do not.
* ``bitfit``: every bias (``nnx.Param`` leaves named ``bias``, LayerNorm biases included, as in
  the BitFit paper).
* ``head``: the task head only.

The task head is trainable in every method. :func:`trainable_paths` lists the trainable leaves
in MODEL order, the order each architecture declares in ``MODEL_ORDER``
(:mod:`spry_jax.models.order`: the order of the PyTorch release's ``named_parameters()``;
layer index numerically, then the family's sub-layer table, LoRA A before B; the head last),
not in the alphabetical order that ``nnx.split`` uses, because Spry's units are consecutive
chunks of this order (Panchal et al., NeurIPS 2024, arXiv 2405.15551: weight splitting).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping
from typing import Any

import jax
from flax import nnx

from spry_jax.models.layers import IA3Param, Linear
from spry_jax.models.order import ModelOrder, variable_rank
from spry_jax.types import SplitModel

METHODS = ("lora", "ia3", "bitfit", "head")


def _declared(name: str) -> Any:
    """The default of ``peft.<name>`` as :func:`spry_jax.config.default_config` declares it (the
    one place it is declared), for the fields a caller leaves out."""

    def default() -> Any:
        from spry_jax import config as config_lib  # local: the config is a leaf of the package

        return config_lib.default_config().peft[name]

    return dataclasses.field(default_factory=default)


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    """A PEFT method and its hyper-parameters.

    A field left out takes its ``default_config().peft`` default.

    Attributes:
      method: "lora", "ia3", "bitfit" or "head".
      lora_rank: LoRA rank r (the paper uses 1).
      lora_alpha: LoRA alpha; the update is scaled by alpha / r (the paper uses 1).
      lora_dropout: dropout on the LoRA input branch (the paper uses 0.1).
      target_modules: regexes searched in Linear state paths (e.g. ``"query$"``); empty = the
        family's default (LoRA: ``LORA_TARGETS``; IA3: ``IA3_TARGETS`` + ``IA3_FEEDFORWARD``).
    """

    method: str = _declared("method")
    lora_rank: int = _declared("lora_rank")
    lora_alpha: float = _declared("lora_alpha")
    lora_dropout: float = _declared("lora_dropout")
    target_modules: tuple[str, ...] = _declared("target_modules")

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"peft.method={self.method!r} is not supported; use one of {METHODS}.")
        if self.method == "lora" and int(self.lora_rank) < 1:
            raise ValueError(f"peft.lora_rank must be >= 1, got {self.lora_rank}.")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"peft.lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if isinstance(self.target_modules, str):
            raise ValueError(
                f"peft.target_modules must be a list of regexes, got the string "
                f"{self.target_modules!r}; wrap it in a list."
            )
        object.__setattr__(self, "target_modules", tuple(self.target_modules or ()))


def as_peft_config(cfg: PeftConfig | Mapping[str, Any] | Any) -> PeftConfig:
    """A :class:`PeftConfig` from itself, a dict, or an ml_collections ConfigDict.

    Unknown fields are refused (a typo would otherwise silently fall back to a default).
    """
    if isinstance(cfg, PeftConfig):
        return cfg
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    if not isinstance(cfg, Mapping):
        raise TypeError(f"peft config must be a PeftConfig, dict or ConfigDict, got {type(cfg)}.")
    names = {f.name for f in dataclasses.fields(PeftConfig)}
    unknown = sorted(set(cfg) - names)
    if unknown:
        raise ValueError(f"Unknown peft config field(s) {unknown}; known: {sorted(names)}.")
    return PeftConfig(**dict(cfg))


def path_str(path: tuple) -> str:
    """``("encoder", "layer", 0, "query")`` -> ``"encoder/layer/0/query"``."""
    return "/".join(str(p) for p in path)


def iter_modules(model: nnx.Module) -> Iterator[tuple[str, nnx.Module]]:
    """``(path, module)`` for every submodule (attribute order; shared modules once)."""
    seen: set[int] = set()

    def walk(obj: Any, prefix: tuple) -> Iterator[tuple[str, nnx.Module]]:
        if id(obj) in seen:
            return
        if isinstance(obj, nnx.Module):
            seen.add(id(obj))
            yield path_str(prefix), obj
            children = [(k, v) for k, v in vars(obj).items() if not k.startswith("_")]
        elif isinstance(obj, (nnx.List, list, tuple)):
            children = list(enumerate(obj))
        else:
            return
        for name, child in children:
            yield from walk(child, (*prefix, name))

    yield from walk(model, ())


def model_order(model: nnx.Module) -> ModelOrder:
    """The architecture's declared :class:`~spry_jax.models.order.ModelOrder`."""
    order = getattr(model, "MODEL_ORDER", None)
    if not isinstance(order, ModelOrder):
        raise TypeError(
            f"{type(model).__name__} declares no MODEL_ORDER; every architecture states the "
            "order of its modules (spry_jax.models.order.ModelOrder), which Spry's units chunk."
        )
    return order


def iter_variables(model: nnx.Module) -> Iterator[tuple[str, nnx.Variable]]:
    """``(path, variable)`` for every variable in the architecture's declared model order
    (``MODEL_ORDER``: layer index, then the family's sub-layer table; inside a module its
    ``VARIABLE_ORDER``: kernel, bias, LoRA A, LoRA B, IA3)."""
    order = model_order(model)
    items = []
    for mpath, module in iter_modules(model):
        names = [
            n
            for n, v in vars(module).items()
            if not n.startswith("_") and isinstance(v, nnx.Variable)
        ]
        if not names:
            continue
        mkey = order.module_key(mpath)
        for name in names:
            path = f"{mpath}/{name}" if mpath else name
            items.append(((mkey, variable_rank(module, name)), path, getattr(module, name)))
    items.sort(key=lambda item: item[0])
    for _, path, value in items:
        yield path, value


def _head_prefixes(model: nnx.Module) -> tuple[str, ...]:
    return tuple(getattr(model, "head_prefixes", ()))


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path == p or path.startswith(p + "/") for p in prefixes)


def _match(path: str, patterns: tuple[str, ...]) -> bool:
    return any(re.search(p, path) for p in patterns)


def apply_peft(
    model: nnx.Module, cfg: PeftConfig | Mapping[str, Any], *, seed: int = 0
) -> nnx.Module:
    """Adds the method's trainable leaves to ``model`` in place and returns it.

    Args:
      model: an architecture from :mod:`spry_jax.models.registry`.
      cfg: the PEFT configuration.
      seed: seeds the LoRA A matrices (each module folds in its index in the declared model
        order, so the draw does not depend on attribute order either).

    Raises:
      ValueError: if the target patterns select no Linear, or the model is already adapted.
    """
    cfg = as_peft_config(cfg)
    if cfg.method not in ("lora", "ia3"):
        return model
    head = _head_prefixes(model)
    order = model_order(model)
    linears = [
        (p, m) for p, m in iter_modules(model) if isinstance(m, Linear) and not _under(p, head)
    ]
    linears.sort(key=lambda item: order.module_key(item[0]))
    if any(m.lora_a is not None or m.ia3 is not None for _, m in linears):
        raise ValueError("The model already has PEFT weights; apply_peft runs once per model.")
    cls = type(model)
    if cfg.method == "lora":
        targets = cfg.target_modules or tuple(getattr(cls, "LORA_TARGETS", ()))
    else:
        feedforward = tuple(getattr(cls, "IA3_FEEDFORWARD", ()))
        targets = cfg.target_modules or (tuple(getattr(cls, "IA3_TARGETS", ())) + feedforward)
    chosen = [(p, m) for p, m in linears if _match(p, targets)]
    if not chosen:
        raise ValueError(
            f"peft.target_modules {list(targets)} matched no Linear of {cls.__name__}; "
            f"Linear paths look like {[p for p, _ in linears[:6]]}."
        )
    key = jax.random.key(seed)
    for i, (p, m) in enumerate(chosen):
        if cfg.method == "lora":
            m.add_lora(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, jax.random.fold_in(key, i))
        else:
            m.add_ia3(on_input=_match(p, feedforward))
    return model


def trainable_paths(model: nnx.Module, cfg: PeftConfig | Mapping[str, Any]) -> tuple[str, ...]:
    """The trainable state paths in model order (the task head last)."""
    cfg = as_peft_config(cfg)
    head = _head_prefixes(model)
    body, head_paths = [], []
    for path, var in iter_variables(model):
        if _under(path, head):
            if type(var) is nnx.Param:
                head_paths.append(path)
            continue
        if cfg.method == "lora":
            keep = isinstance(var, nnx.LoRAParam)
        elif cfg.method == "ia3":
            keep = isinstance(var, IA3Param)
        elif cfg.method == "bitfit":
            keep = type(var) is nnx.Param and path.rsplit("/", 1)[-1] == "bias"
        else:
            keep = False
        if keep:
            body.append(path)
    if cfg.method in ("lora", "ia3") and not body:
        raise ValueError(
            f"peft.method={cfg.method!r} but the model has no {cfg.method} weights; "
            "call apply_peft(model, cfg) first (from_pretrained(..., peft=cfg) does)."
        )
    return tuple(body + head_paths)


def split_model(model: nnx.Module, peft_cfg: PeftConfig | Mapping[str, Any]) -> SplitModel:
    """Splits an (adapted) model at the functional boundary of :class:`spry_jax.types.SplitModel`.

    ``apply_fn(trainable, frozen, input_ids, attention_mask, dropout_rng=None,
    token_type_ids=None)`` merges the two halves and calls the model; it is pure, jittable,
    vmappable and jvp-able in ``trainable``. Segment ids reach only models whose
    ``uses_token_types`` is true (BERT, ALBERT); for the others (RoBERTa's single segment,
    DistilBERT, decoders) they are dropped, as those models' own tokenizers never produce them.
    """
    cfg = as_peft_config(peft_cfg)
    order = trainable_paths(model, cfg)
    wanted = set(order)
    graphdef, train_state, frozen = nnx.split(model, lambda p, _: path_str(p) in wanted, ...)
    flat = {path_str(p): (p, v) for p, v in nnx.to_flat_state(train_state)}
    trainable = {k: flat[k][1][...] for k in order}
    # Only shapes/types are kept, so the closure holds no copy of the initial weights.
    templates = {
        k: (p, v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype))) for k, (p, v) in flat.items()
    }

    uses_token_types = bool(getattr(model, "uses_token_types", False))

    def apply_fn(
        trainable, frozen, input_ids, attention_mask, dropout_rng=None, token_type_ids=None
    ):
        missing = set(templates) - set(trainable)
        if missing:
            raise KeyError(f"trainable is missing {sorted(missing)[:4]}.")
        state = nnx.from_flat_state(
            [(p, v.replace(trainable[k])) for k, (p, v) in templates.items()]
        )
        module = nnx.merge(graphdef, state, frozen)
        if uses_token_types and token_type_ids is not None:
            return module(input_ids, attention_mask, token_type_ids, dropout_rng=dropout_rng)
        return module(input_ids, attention_mask, dropout_rng=dropout_rng)

    head = _head_prefixes(model)
    return SplitModel(
        apply_fn=apply_fn,
        trainable=trainable,
        frozen=frozen,
        order=order,
        head_keys=tuple(k for k in order if _under(k, head)),
        task=getattr(model, "task", "classification"),
        num_labels=int(getattr(model, "num_labels", 2)),
        peft_method=cfg.method,
    )


def count_parameters(tree: Mapping[str, Any]) -> int:
    """Total number of scalars in a flat dict of arrays."""
    return int(sum(int(v.size) for v in tree.values()))
