"""The algorithm table: every method is a row, not a training loop.

A method = gradient estimator x split rule x client optimizer x server optimizer x
communication mode; the baselines are those the Spry paper compares with (Panchal et al., NeurIPS 2024, arXiv 2405.15551). The round program (:mod:`spry_jax.core.round`) never
branches on a method's name; :func:`build_round_parts` turns a row plus the config into the
pieces the round needs, and :func:`model_options` into the options of the model build
(``make_split_model(..., **model_options(name))``: MeBP's per-layer checkpoints, MeSP's LoRA
recompute and the backprop rows' lazy dequantisation are how the model is built, so their
estimator is plain backprop).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import optax

from spry_jax.core import client as client_lib
from spry_jax.core import estimators, zero_order
from spry_jax.core import server as server_lib
from spry_jax.core import units as units_lib
from spry_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the algorithm table.

    Attributes:
      estimator: key of :data:`ESTIMATORS`.
      split: True = Spry's weight split across the round's clients.
      server: default server optimizer (``server.optimizer='auto'`` takes it).
      client: default client optimizer (``client.optimizer='auto'`` takes it).
      max_steps: if set, local steps per round are capped (FedSGD: 1).
      client_lr: if set, the client learning rate is fixed (FedSGD: 1.0, so delta = -grad).
      comm_modes: communication modes the method supports.
      doc: one line for ``--helpfull`` and README tables.
      remat: how the model is built for backprop (``make_split_model(..., remat=...)``):
        ``"none"``; ``"layer"``, a checkpoint per transformer layer (MeBP); ``"lora"``, LoRA's
        ``xA`` recomputed in the backward pass (MeSP). See :func:`model_options`.
    """

    estimator: str
    split: bool
    server: str
    client: str = "adamw"
    max_steps: int | None = None
    client_lr: float | None = None
    comm_modes: tuple[str, ...] = ("per_epoch",)
    doc: str = ""
    remat: str = "none"


LORA_A_MODES = ("perturb", "frozen")


def _forward(
    cfg: Any,
    head_keys: tuple[str, ...] = (),
    trainable_keys: tuple[str, ...] = (),
    tangent_sets: tuple[tuple[str, ...], ...] = (),
) -> estimators.Estimator:
    lora_a = cfg.fwd.lora_a
    if lora_a not in LORA_A_MODES:
        raise ValueError(f"fwd.lora_a must be one of {LORA_A_MODES}, got {lora_a!r}")
    frozen = tuple(k for k in trainable_keys if k.endswith("lora_a")) if lora_a == "frozen" else ()
    if lora_a == "frozen" and cfg.peft.method != "lora":
        raise ValueError(
            f"fwd.lora_a='frozen' needs LoRA adapters, got peft.method={cfg.peft.method!r}. "
            "Drop fwd.lora_a or set peft.method='lora'."
        )
    return estimators.forward(
        cfg.fwd.num_tangents,
        cfg.fwd.sigma,
        cfg.fwd.tangent_batching,
        head_keys=head_keys,
        head_mode=cfg.fwd.head,
        head_tangents=cfg.fwd.head_tangents,
        distribution=cfg.fwd.tangents,
        frozen_keys=frozen,
        tangent_sets=tangent_sets,
    )


def static_tangents_blocker(cfg: Any) -> str | None:
    """Why ``round.static_tangents`` cannot apply to ``cfg`` (None: it can).

    It needs a method that splits forward gradients over the clients (a slot's units are then
    fixed for the run) and a client traced alone (``round.backend`` loop or debug, or
    ``round.client_chunk = 1``): under ``vmap`` the switch over the slots' leaf sets would run
    every branch.
    """
    method = get_method(cfg.method)
    if method.estimator != "forward":
        return f"method={cfg.method!r} estimates no forward gradient"
    if not method.split:
        return f"method={cfg.method!r} perturbs every leaf on every client (no weight split)"
    if cfg.round.backend not in ("loop", "debug") and cfg.round.client_chunk != 1:
        return (
            f"round.backend={cfg.round.backend!r} with round.client_chunk="
            f"{cfg.round.client_chunk} vmaps the clients, so every branch would run; set "
            "round.client_chunk=1 (or round.backend='loop')"
        )
    return None


def static_tangent_sets(cfg: Any, units: units_lib.Units) -> tuple[tuple[str, ...], ...]:
    """The leaf sets of ``round.static_tangents`` for ``cfg`` (``()``: off or not applicable
    under ``auto``); ``on`` where it cannot apply is refused, naming the reason."""
    mode = cfg.round.static_tangents
    if mode == "off":
        return ()
    blocker = static_tangents_blocker(cfg)
    if blocker and mode == "on":
        raise ConfigError(f"round.static_tangents='on': {blocker}; or set it to 'auto'.")
    if blocker:
        return ()
    return units_lib.tangent_sets(units, cfg.clients_per_round, estimators.layer_index)


# Each builder takes the config and the model's head keys (only the forward estimator reads them).
ESTIMATORS: dict[str, Callable[..., estimators.Estimator]] = {
    "forward": _forward,
    "backprop": lambda cfg, head_keys=(): estimators.backprop(),
    "lcsb": lambda cfg, head_keys=(): estimators.lcsb(cfg.lcsb.layers_per_step),
    "mezo": lambda cfg, head_keys=(): zero_order.spsa(cfg.zo.num_perturbations, cfg.zo.eps, "zo"),
    "baffle": lambda cfg, head_keys=(): zero_order.spsa(
        cfg.zo.baffle_num_perturbations, cfg.zo.baffle_sigma, "zo.baffle"
    ),
    "fwdllm": lambda cfg, head_keys=(): zero_order.fwdllm(
        cfg.zo.fwdllm_num_candidates,
        cfg.zo.fwdllm_num_perturbations,
        cfg.zo.fwdllm_eps,
        cfg.zo.fwdllm_var_threshold,
    ),
}

BOTH = ("per_epoch", "per_iteration")

METHODS: dict[str, Method] = {
    "spry": Method(
        "forward",
        True,
        "fedyogi",
        comm_modes=BOTH,
        doc="Spry: forward gradients on each client's slice of the PEFT weights",
    ),
    "fedfgd": Method(
        "forward",
        False,
        "fedyogi",
        comm_modes=BOTH,
        doc="forward gradients on all trainable weights (no split)",
    ),
    "fedavg": Method("backprop", False, "fedavg", doc="backprop FedAvg"),
    "fedyogi": Method("backprop", False, "fedyogi", doc="backprop FedYogi"),
    "fedsgd": Method(
        "backprop",
        False,
        "adam",
        client="sgd",
        max_steps=1,
        client_lr=1.0,
        doc="one backprop step per round; the server applies Adam to the mean gradient",
    ),
    "fedavg_split": Method("backprop", True, "fedavg", doc="backprop on Spry's split, FedAvg"),
    "fedyogi_split": Method("backprop", True, "fedyogi", doc="backprop on Spry's split, FedYogi"),
    "fedavg_remat": Method(
        "backprop",
        False,
        "fedavg",
        doc="MeBP: backprop with activation checkpointing",
        remat="layer",
    ),
    "fedmezo": Method(
        "mezo", False, "fedavg", doc="FedMeZO: zero-order SPSA (two forwards at w +- eps z)"
    ),
    "baffle_plus": Method(
        "baffle",
        False,
        "fedyogi",
        doc="Baffle+: zero-order central differences, K = 10, sigma = 1e-4, FedYogi",
    ),
    "fwdllm_plus": Method(
        "fwdllm",
        False,
        "fedyogi",
        doc="FwdLLM+: finite-difference forward gradient along directions picked for "
        "similarity to the last round's update, clients with variance >= 1e2 dropped, FedYogi",
    ),
    "fedavg_mesp": Method(
        "backprop",
        False,
        "fedavg",
        doc="MeSP: backprop recomputing the LoRA intermediate xA in the backward pass",
        remat="lora",
    ),
    "fedavg_lcsb": Method(
        "lcsb",
        False,
        "fedavg",
        doc="LCSB: backprop through a cyclic block of layers per local step, FedAvg",
    ),
}


# Server learning rate when ``server.lr`` is unset: FedAvg takes the plain mean (1.0); the
# adaptive servers use the Spry release's 1e-2.
SERVER_DEFAULT_LR = {
    "fedavg": 1.0,
    "sgd": 1.0,
    "fedadam": 1e-2,
    "fedyogi": 1e-2,
    "optax_adam": 1e-2,
    "optax_yogi": 1e-2,
    "adam": 1e-3,
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method={name!r} is unknown; choose one of {', '.join(sorted(METHODS))}.")
    return METHODS[name]


# Estimators that differentiate the loss in reverse mode: their rows build the model with a
# lazily dequantised quantised base and cut layer cotangents (custom_vjps, which forward mode
# cannot go through).
BACKPROP_ESTIMATORS = ("backprop", "lcsb")


def model_options(name: str) -> dict[str, Any]:
    """The model-build options method ``name``'s row names, as keyword arguments of
    :func:`spry_jax.models.make_split_model`: ``remat`` (the row's ``remat``) and
    ``lazy_dequant`` (every backprop row: a quantised base is dequantised again in the
    backward pass rather than kept in float, as MeBP as published does, arXiv 2510.03425) and
    ``cut_cotangents`` (every backprop row: each layer's output cotangent is materialised once
    instead of recomputed by XLA CPU's fusions in every layer below,
    :func:`spry_jax.models.layers.cut_cotangent`)."""
    method = get_method(name)
    reverse = method.estimator in BACKPROP_ESTIMATORS
    return {"remat": method.remat, "lazy_dequant": reverse, "cut_cotangents": reverse}


@dataclasses.dataclass(frozen=True)
class RoundParts:
    """What :class:`spry_jax.core.round.RoundSpec` needs from the method row and the config.

    ``client_var_threshold`` is FwdLLM+'s server-side client filter
    (``zo.fwdllm_client_var_threshold``, FwdLLM+ only; 0 = off).
    """

    estimator: estimators.Estimator
    client_optimizer: optax.GradientTransformation
    server_optimizer: optax.GradientTransformation
    split: bool
    max_steps: int | None
    fwd_sigma: float | None
    fwd_tangents: str = "gaussian"
    client_var_threshold: float = 0.0
    per_iteration_round_optimizer: bool = False


def resolved_optimizers(cfg: Any) -> dict[str, Any]:
    """The optimizer names and learning rates a config resolves to: ``"auto"``, an unset
    ``server.lr`` and a method's fixed client lr replaced by what the round uses.

    Returns:
      ``{"client.optimizer", "client.lr", "server.optimizer", "server.lr"}``.
    """
    method = get_method(cfg.method)
    server_name = method.server if cfg.server.optimizer == "auto" else cfg.server.optimizer
    if server_name not in SERVER_DEFAULT_LR:
        raise ValueError(
            f"server.optimizer={server_name!r} is unknown; choose 'auto' or one of "
            f"{', '.join(server_lib.SERVER_OPTIMIZERS)}."
        )
    return {
        "client.optimizer": method.client
        if cfg.client.optimizer == "auto"
        else cfg.client.optimizer,
        "client.lr": method.client_lr if method.client_lr is not None else cfg.client.lr,
        "server.optimizer": server_name,
        "server.lr": cfg.server.lr if cfg.server.lr is not None else SERVER_DEFAULT_LR[server_name],
    }


def build_round_parts(
    cfg: Any,
    head_keys: tuple[str, ...] = (),
    trainable_keys: tuple[str, ...] = (),
    tangent_sets: tuple[tuple[str, ...], ...] = (),
) -> RoundParts:
    """Resolves the method row and the config into estimator and optimizers.

    ``head_keys`` (``SplitModel.head_keys``) reach the forward estimator for ``fwd.head``,
    ``trainable_keys`` (the model's trainable leaves) for ``fwd.lora_a``, and ``tangent_sets``
    (:func:`static_tangent_sets`) for ``round.static_tangents``.
    """
    method = get_method(cfg.method)
    if cfg.comm_mode not in method.comm_modes:
        raise ValueError(
            f"comm_mode={cfg.comm_mode!r} is not available for method={cfg.method!r}; "
            f"it supports {method.comm_modes}."
        )
    if cfg.comm_mode == "per_iteration" and cfg.fwd.head != "joint":
        raise ValueError(
            f"fwd.head={cfg.fwd.head!r} needs comm_mode='per_epoch' (per-iteration clients send "
            "only the K jvp scalars of one joint perturbation); set fwd.head='joint'."
        )
    if cfg.comm_mode == "per_iteration" and cfg.fwd.lora_a != "perturb":
        raise ValueError(
            f"fwd.lora_a={cfg.fwd.lora_a!r} needs comm_mode='per_epoch' (the server regenerates "
            "tangents on every leaf of a unit); set fwd.lora_a='perturb'."
        )
    resolved = resolved_optimizers(cfg)
    client_name, client_lr = resolved["client.optimizer"], resolved["client.lr"]
    server_name, server_lr = resolved["server.optimizer"], resolved["server.lr"]
    if cfg.client.momentum and client_name != "sgd":
        raise ValueError(
            f"client.momentum={cfg.client.momentum} is SGD's; method={cfg.method!r} resolves "
            f"client.optimizer to {client_name!r}. Set client.optimizer='sgd' or "
            "client.momentum=0."
        )
    round_optimizer = cfg.per_iteration.server_round_optimizer
    server_optimizer = server_lib.with_schedule(
        server_lib.make_server_optimizer(
            server_name, server_lr, cfg.server.b1, cfg.server.b2, cfg.server.tau
        ),
        cfg.server.schedule,
        cfg.rounds,
        cfg.server.final_fraction,
    )
    if cfg.comm_mode == "per_iteration" and not round_optimizer:
        _check_no_round_optimizer(cfg)
        # The plain form applies no round-level optimizer (core/round.py); FedAvg with lr 1 is
        # what it amounts to, and keeps no state (no dead moments in the checkpoints).
        server_optimizer = server_lib.make_server_optimizer("fedavg", 1.0)
    return RoundParts(
        estimator=(
            _forward(cfg, head_keys, trainable_keys, tangent_sets)
            if method.estimator == "forward"
            else ESTIMATORS[method.estimator](cfg, head_keys)
        ),
        client_optimizer=client_lib.make_client_optimizer(
            client_name,
            client_lr,
            b1=cfg.client.b1,
            b2=cfg.client.b2,
            eps=cfg.client.eps,
            weight_decay=cfg.client.weight_decay,
            momentum=cfg.client.momentum,
        ),
        server_optimizer=server_optimizer,
        split=method.split,
        max_steps=method.max_steps,
        fwd_sigma=cfg.fwd.sigma if method.estimator == "forward" else None,
        fwd_tangents=cfg.fwd.tangents,
        client_var_threshold=(
            float(cfg.zo.fwdllm_client_var_threshold) if method.estimator == "fwdllm" else 0.0
        ),
        per_iteration_round_optimizer=bool(round_optimizer),
    )


def _check_no_round_optimizer(cfg: Any) -> None:
    """Per-iteration mode without a round-level optimizer ignores the server.* settings: refuse
    explicit ones rather than run something other than what the config says."""
    set_fields = [
        f"server.{k}={v!r}"
        for k, v, default in (
            ("optimizer", cfg.server.optimizer, "auto"),
            ("lr", cfg.server.lr, None),
            ("schedule", cfg.server.schedule, "constant"),
        )
        if v != default
    ]
    if set_fields:
        raise ValueError(
            f"{', '.join(set_fields)} has no effect with comm_mode='per_iteration': its plain "
            "form steps only the per-step optimizer (client.optimizer/client.lr). Drop it, or set "
            "per_iteration.server_round_optimizer=True to also apply the server optimizer to each "
            "round's net change."
        )
