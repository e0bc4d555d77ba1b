"""The default experiment config (every field, one comment each) and its validation.

:func:`default_config` is the single source of truth: every field the package reads is declared
there, with its default and a comment, and nowhere else. Experiment files in ``experiments/``
start from it and change what they need; ``--config.KEY=VALUE`` overrides any field on the
command line (:func:`register_cli_parsers` makes every declared type settable, ``None`` and
dicts included). Code that gets a partial config -- a library caller's ``{"name": "synthetic"}``,
a ``config.json`` written before a field existed -- completes it with :func:`complete`, the one
accessor, so a field left out takes its declared default and a misspelt one is refused.
:func:`validate` holds the checks that need no data or model, each once.

This module imports nothing from :mod:`spry_jax.core`; the method table and the data checks are
imported inside :func:`validate`, which needs them.
"""

from __future__ import annotations

import ast
import difflib
import math
import os
from collections.abc import Mapping
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_dict, config_flags

from spry_jax.errors import ConfigError, UserError
from spry_jax.types import BACKENDS, COMM_MODES


def default_config() -> ml_collections.ConfigDict:
    """Spry's defaults as in its release (the per-epoch client update and FedYogi server of
    Panchal et al., "Thinking Forward: Memory-Efficient Federated Finetuning of Language
    Models", NeurIPS 2024, arXiv 2405.15551, and github.com/Astuary/Spry), on the offline
    MiniLM + Rotten Tomatoes assets."""
    c = ml_collections.ConfigDict()
    c.method = "spry"  # a row of spry_jax.methods.METHODS
    c.seed = 0  # every key derives from it: fold_in(round), fold_in(client), fold_in(step)
    c.rounds = 100  # federated rounds
    c.num_clients = 100  # total clients the data is partitioned over
    c.clients_per_round = 10  # M, clients sampled (without replacement) each round
    c.eval_every = 10  # evaluate every N rounds (and after the last); 0 = only at the end
    c.checkpoint_every = 10  # save a checkpoint every N rounds (and after the last)
    c.keep_checkpoints = 2  # how many checkpoints to keep
    # Rounds between the host reading the device's round metrics back (the loss, the finiteness
    # guard) and writing them to metrics.jsonl: 1 = every round; N > 1 keeps N rounds' metrics
    # on the device so the host never waits on it in between (every round still gets its own
    # record). Eval and checkpoint rounds always read back: nothing non-finite is ever saved.
    c.log_every = 1
    c.comm_mode = "per_epoch"  # "per_epoch" | "per_iteration" (forward-gradient methods)
    c.resume_allow_schedule_change = False  # resume with new rounds under a non-constant schedule

    c.per_iteration = ml_collections.ConfigDict()  # comm_mode=per_iteration (core/round.py)
    c.per_iteration.server_round_optimizer = False  # True: server.optimizer also steps per round

    c.data = ml_collections.ConfigDict()
    c.data.name = "rotten_tomatoes"  # a spry_jax.data registry name, or csv/jsonl/parquet
    c.data.partition = "dirichlet"  # "dirichlet" | "group_dirichlet" | "natural" | "iid"
    c.data.alpha = 1.0  # Dirichlet concentration (0.1 = very heterogeneous)
    c.data.max_length = 64  # tokens per example, every dataset (the QA experiment sets 384)
    c.data.test_fraction = 0.2  # each client's local test split
    c.data.val_fraction = 0.0  # share of each client's local train split held out to validate
    c.data.max_examples = 0  # 0 = all; else a deterministic subsample (CPU runs)
    c.data.qa_stride = 128  # QA: overlap of the sliding window over long contexts
    c.data.path = ""  # local file/directory for csv/jsonl/parquet/squad_json or a hub copy
    # True: the official test split (hub datasets), a local file's split-column "test" rows, or
    # a heldout_fraction hash split stays out of the clients and is scored after the last round
    # (eval/heldout_* in summary.json). False (paper): pool everything. A split column implies it.
    c.data.heldout = False
    c.data.heldout_fraction = 0.0  # data.heldout without an official test split: hashed share
    c.data.columns = ml_collections.ConfigDict()  # csv/jsonl/parquet: which column is what
    c.data.columns.text = "text"  # the (first) text
    c.data.columns.text_pair = ""  # the second text of a sentence pair; "" = none
    c.data.columns.label = "label"  # the label: names (strings) or indices 0..K-1
    c.data.columns.group = ""  # a natural group (user, movie) for partition=natural; "" = none
    c.data.columns.split = "split"  # rows "train"/"test" (test = held out), used if present
    # Local files: the label set in index order, e.g. "('neg','pos')" (or "neg,pos"); () = the
    # labels found in the file (a warning lists them; integer labels must then be 0..K-1).
    c.data.label_names = ()
    c.data.vocab_size = 128  # synthetic only: token ids in [4, vocab_size)
    c.data.num_examples = 2000  # synthetic only
    c.data.num_labels = 2  # synthetic only
    c.data.seq_len = 16  # synthetic only
    c.data.synthetic_seed = 0  # synthetic only: the generator's seed (not the experiment's)

    c.model = ml_collections.ConfigDict()
    c.model.name = "minilm"  # registry alias, hub id or local directory
    c.model.pretrained = True  # False = random init from the architecture config
    c.model.dtype = "float32"  # frozen base and activations: "float32" | "bfloat16" | "float16"
    c.model.quant = "none"  # frozen Linear kernels: "none" | "int8" | "int4"
    c.model.dropout = 0.1  # model dropout (hidden and attention), active in training
    # dropout masks' bits: "hash" (threefry's keys, hashed bits: fast) | "threefry" (JAX's
    # default generator; what runs before this field existed used)
    c.model.dropout_bits = "hash"
    c.model.pooling = "default"  # "default" (the family's head) | "mean"
    c.model.overrides = config_dict.placeholder(dict)  # HF config overrides (tiny models)
    c.model.tokenizer = ""  # tokenizer name/path; "" = the model's own

    c.peft = ml_collections.ConfigDict()
    c.peft.method = "lora"  # "lora" | "ia3" | "bitfit" | "head"
    c.peft.lora_rank = 1  # LoRA r (paper: 1)
    c.peft.lora_alpha = 1.0  # LoRA alpha (paper: 1)
    c.peft.lora_dropout = 0.1  # dropout on the LoRA branch input
    c.peft.target_modules = ()  # regexes of adapted modules; () = query/value (q_proj/v_proj)

    c.split = ml_collections.ConfigDict()
    c.split.tensors_per_unit = 2  # consecutive trainable tensors per unit (2 = one LoRA A+B)
    c.split.classifier_share = False  # True: every client also trains the task head

    c.fwd = ml_collections.ConfigDict()
    c.fwd.num_tangents = 1  # K tangents per step
    c.fwd.sigma = 1.0  # tangent std; E[g] = sigma^2 grad
    c.fwd.tangent_batching = "vmap"  # "vmap" (fast) | "map" (sequential, least memory)
    c.fwd.head = "joint"  # task head: "joint" (paper) | "separate" (own tangents) | "exact"
    c.fwd.head_tangents = 16  # fwd.head="separate": the head's own tangents (each ~free)
    c.fwd.tangents = "gaussian"  # tangent distribution: "gaussian" (paper) | "rademacher" (+-sigma)
    c.fwd.lora_a = (
        "perturb"  # "perturb" (paper) | "frozen": A keeps its init (LoRA-FA), B perturbed
    )

    c.zo = ml_collections.ConfigDict()
    c.zo.eps = 1e-3  # FedMeZO: perturbation scale, forwards at w +- eps z
    c.zo.num_perturbations = 1  # FedMeZO: SPSA directions per step (averaged)
    c.zo.baffle_sigma = 1e-4  # Baffle+: perturbation scale
    c.zo.baffle_num_perturbations = 10  # Baffle+: K directions per step, each weighted 1/K
    c.zo.fwdllm_eps = 1e-2  # FwdLLM+: finite-difference scale h (release: 1e-2)
    c.zo.fwdllm_num_candidates = 200  # FwdLLM+: pool drawn per step (release: 10 x K)
    c.zo.fwdllm_num_perturbations = 20  # FwdLLM+: K best-aligned directions used (SQuAD: 1)
    c.zo.fwdllm_client_var_threshold = 1e2  # FwdLLM+: drop clients with variance >= it; 0 = off
    c.zo.fwdllm_var_threshold = 0.0  # FwdLLM+ option: skip noisier steps (relative); 0 = off

    c.lcsb = ml_collections.ConfigDict()
    c.lcsb.layers_per_step = 1  # LCSB: layers per cyclic block (the task head is in every block)

    c.client = ml_collections.ConfigDict()
    c.client.optimizer = "auto"  # "auto" (the method's) | "adamw" | "adam" | "sgd"
    c.client.lr = 1e-4  # client learning rate
    c.client.b1 = 0.9
    c.client.b2 = 0.999
    c.client.eps = 1e-8
    c.client.weight_decay = 0.01  # AdamW weight decay (masked: untrained units never decay)
    c.client.momentum = 0.0  # SGD momentum (client.optimizer = "sgd" only); 0 = plain SGD
    c.client.epochs = 1  # local epochs per round
    c.client.batch_size = 8  # local batch size
    c.client.max_steps = 0  # 0 = all steps of the epochs; else a cap on local steps

    c.server = ml_collections.ConfigDict()
    c.server.optimizer = (
        "auto"  # "auto" | fedavg | fedadam | fedyogi | optax_adam | optax_yogi | adam
    )
    c.server.lr = config_dict.placeholder(
        float
    )  # None = the optimizer's default (FedAvg 1, Yogi 1e-2)
    c.server.b1 = 0.9
    c.server.b2 = 0.99
    c.server.tau = 1e-3  # Flower's adaptivity constant (eps of the optax variants)
    c.server.schedule = "constant"  # server step over rounds: "constant" | "cosine" | "linear"
    c.server.final_fraction = 0.0  # cosine/linear: the step at the last round, as a fraction

    c.round = ml_collections.ConfigDict()
    c.round.backend = "shard_map"  # "shard_map" | "vmap" | "loop" | "debug"
    c.round.num_devices = 0  # devices on the 'clients' mesh axis; 0 = all
    # clients vmapped at once per device (a scan over chunks: peak memory grows with it, not
    # with clients_per_round); 0 = all of a device's clients at once. shard_map / vmap only.
    c.round.client_chunk = 0
    # Spry's jvp only over the client's own layers (symbolic zeros below its lowest unit): "auto"
    # where a client is traced alone (round.backend loop/debug, or round.client_chunk = 1) and
    # the method splits forward gradients; "on" refuses a config where it cannot apply; "off".
    c.round.static_tangents = "auto"
    c.eval_batch_size = 64  # evaluation batch size
    c.eval_all_clients = True  # after the last round: global model on every client's test split
    c.report = ml_collections.ConfigDict()
    # JSON rows {"label", "accuracy", "ci95", "source"} printed beside this run when it ends
    c.report.reference = ""  # e.g. the study figures a config is compared with; "" = none
    c.log_memory = True  # record XLA's memory estimate of one client step (compiles it once)
    c.memory = ml_collections.ConfigDict()  # the memory check before the first round
    c.memory.check = True  # refuse a round whose estimated peak exceeds the memory available
    c.memory.budget_gib = 0.0  # 0 = what the process can use now (device, cgroup, MemAvailable)
    return c


def paper_setting(
    c: ml_collections.ConfigDict,
    *,
    dataset: str,
    model: str,
    clients_per_round: int,
    num_clients: int,
    max_length: int = 64,
) -> ml_collections.ConfigDict:
    """The common settings of the Spry release's run scripts (github.com/Astuary/Spry; the
    experimental setup of Panchal et al., NeurIPS 2024, arXiv 2405.15551): LoRA r = alpha = 1
    on query/value, AdamW 1e-4, batch 8, one local epoch, FedYogi server, 1500 rounds."""
    c.method = "spry"
    c.rounds = 1500
    c.eval_every = 50
    c.checkpoint_every = 50
    c.num_clients = num_clients
    c.clients_per_round = clients_per_round
    c.data.name = dataset
    c.data.partition = "dirichlet"
    c.data.alpha = 1.0
    c.data.max_length = max_length
    c.model.name = model
    c.peft.method = "lora"
    c.peft.lora_rank = 1
    c.peft.lora_alpha = 1.0
    c.client.lr = 1e-4
    c.client.batch_size = 8
    c.client.epochs = 1
    return c


def local_variant(
    c: ml_collections.ConfigDict, *, dataset: str, model: str, **model_fields
) -> ml_collections.ConfigDict:
    """Shrinks a paper setting to run on a laptop CPU in minutes: the same method, PEFT and
    optimizers on an offline stand-in dataset and model, few clients and rounds."""
    c.rounds = 3
    c.eval_every = 1
    c.checkpoint_every = 1
    c.num_clients = 20
    c.clients_per_round = min(c.clients_per_round, 4)
    c.data.name = dataset
    c.data.max_examples = 800
    c.data.max_length = min(c.data.max_length, 48)
    c.model.name = model
    for k, v in model_fields.items():
        c.model[k] = v
    c.client.max_steps = 4
    c.eval_batch_size = 32
    c.round.backend = "vmap"
    return c


def check_variant(variant: str, known: tuple[str, ...] = ("", "local")) -> None:
    if variant not in known:
        raise ConfigError(
            f"config variant {variant!r} is unknown; use one of {known} (file.py:local)."
        )


# model.dtype: the frozen base and activations (spry_jax.models.loading.as_dtype reads these).
MODEL_DTYPES = ("float32", "bfloat16", "float16")
STATIC_TANGENTS = ("auto", "on", "off")  # round.static_tangents (spry_jax.methods)
DROPOUT_BITS = ("hash", "threefry")  # model.dropout_bits (spry_jax.models.random_bits)


def validate(config: ml_collections.ConfigDict) -> None:
    """Rejects invalid values before any work, naming the field and the fix."""
    from spry_jax import methods  # local: methods imports optax/jax-heavy modules
    from spry_jax.data import registry as data_registry

    check_types(config)

    try:
        methods.get_method(config.method)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if config.rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {config.rounds}")
    if config.num_clients < 1:
        raise ConfigError(f"num_clients must be >= 1, got {config.num_clients}")
    if not 1 <= config.clients_per_round <= config.num_clients:
        raise ConfigError(
            f"clients_per_round={config.clients_per_round} must be in [1, num_clients="
            f"{config.num_clients}]; lower clients_per_round or raise num_clients."
        )
    for field in ("eval_every", "checkpoint_every"):
        if config[field] < 0:
            raise ConfigError(f"{field} must be >= 0, got {config[field]}")
    if config.log_every < 1:
        raise ConfigError(f"log_every must be >= 1 (1 = every round), got {config.log_every}")
    if config.keep_checkpoints < 1:
        raise ConfigError(f"keep_checkpoints must be >= 1, got {config.keep_checkpoints}")
    if config.comm_mode not in COMM_MODES:
        raise ConfigError(f"comm_mode={config.comm_mode!r}; choose one of {COMM_MODES}.")
    if config.round.backend not in BACKENDS:
        raise ConfigError(f"round.backend={config.round.backend!r}; choose one of {BACKENDS}.")
    if config.model.dtype not in MODEL_DTYPES:
        raise ConfigError(
            f"model.dtype={config.model.dtype!r}; choose one of {MODEL_DTYPES} (the frozen base "
            "and activations; trainable weights, tangents and optimizer state stay float32)."
        )
    if config.round.static_tangents not in STATIC_TANGENTS:
        raise ConfigError(
            f"round.static_tangents={config.round.static_tangents!r}; choose one of "
            f"{STATIC_TANGENTS} (auto: where a client is traced alone)."
        )
    if config.model.dropout_bits not in DROPOUT_BITS:
        raise ConfigError(
            f"model.dropout_bits={config.model.dropout_bits!r}; choose one of {DROPOUT_BITS} "
            '("hash": hashed mask bits, fast; "threefry": JAX\'s default generator).'
        )
    if config.client.lr <= 0:
        raise ConfigError(f"client.lr must be > 0, got {config.client.lr}")
    if config.server.lr is not None and config.server.lr <= 0:
        raise ConfigError(
            f"server.lr must be > 0 (or unset for the default), got {config.server.lr}"
        )
    if not 0.0 <= config.client.momentum < 1.0:
        raise ConfigError(
            f"client.momentum must be in [0, 1) (0 = plain SGD), got {config.client.momentum}"
        )
    if config.client.epochs < 1:
        raise ConfigError(f"client.epochs must be >= 1, got {config.client.epochs}")
    if config.client.batch_size < 1:
        raise ConfigError(f"client.batch_size must be >= 1, got {config.client.batch_size}")
    if config.client.max_steps < 0:
        raise ConfigError(f"client.max_steps must be >= 0, got {config.client.max_steps}")
    if config.fwd.num_tangents < 1:
        raise ConfigError(f"fwd.num_tangents must be >= 1, got {config.fwd.num_tangents}")
    if config.fwd.sigma <= 0:
        raise ConfigError(f"fwd.sigma must be > 0, got {config.fwd.sigma}")
    if config.zo.fwdllm_client_var_threshold < 0:
        raise ConfigError(
            "zo.fwdllm_client_var_threshold must be >= 0 (0 = off), got "
            f"{config.zo.fwdllm_client_var_threshold}"
        )
    if config.split.tensors_per_unit < 1:
        raise ConfigError(
            f"split.tensors_per_unit must be >= 1, got {config.split.tensors_per_unit}"
        )
    # Data-independent data checks (alpha, fractions, ...), before anything is loaded.
    data_registry.check_data_config(config.data)
    if config.memory.budget_gib < 0 or not math.isfinite(config.memory.budget_gib):
        raise ConfigError(
            f"memory.budget_gib must be >= 0 (0 = the memory available), got "
            f"{config.memory.budget_gib}"
        )
    if config.report.reference and not os.path.isfile(config.report.reference):
        raise ConfigError(
            f"report.reference={config.report.reference!r} is not a file; give the path of a "
            "JSON list of reference rows, or set report.reference='' to print none."
        )
    # Method/comm-mode compatibility and optimizer names are checked by building the parts.
    try:
        methods.build_round_parts(config)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"server.optimizer": ..., ...}``: the leaf fields of a (nested) ConfigDict or dict."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, (ml_collections.ConfigDict, Mapping)):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _section(name: str) -> ml_collections.ConfigDict:
    node = default_config()
    for part in name.split(".") if name else ():
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise ValueError(f"{name!r} is not a group of config fields")
        node = node[part]
    return node


def complete(
    cfg: Any = None, section: str = "", *, error: type[UserError] = ConfigError
) -> ml_collections.ConfigDict:
    """``cfg`` over the declared defaults: the one way a partial config is read.

    Args:
      cfg: a ConfigDict or (nested) dict, possibly partial -- a library caller's
        ``{"name": "synthetic"}``, or a ``config.json`` written before a field was added (a
        field is only ever added with the default that reproduces the old behaviour). JSON
        lists become tuples where the field is a tuple.
      section: the group ``cfg`` describes ("" = the whole config, or e.g. "data", "peft").
      error: the exception type raised (the data package raises its ``DataError``).

    Returns:
      A new ConfigDict holding every field of ``default_config()`` (or of its ``section``),
      with the values ``cfg`` gives.

    Raises:
      error: a key :func:`default_config` does not declare (naming the closest declared
        fields), or a value of the wrong type (naming the field and its type).
    """
    out = _section(section)
    given = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg or {})
    prefix = f"{section}." if section else ""

    def fill(node: ml_collections.ConfigDict, over: Mapping, prefix: str) -> None:
        for k, v in over.items():
            key = f"{prefix}{k}"
            if k not in node:
                close = closest_fields(key, sorted(flatten(default_config())))
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                what = section.split(".")[0] if section else "config"
                raise error(f"{key} is not a {what} field{hint}")
            current = node[k]
            if isinstance(current, ml_collections.ConfigDict):
                if not isinstance(v, Mapping):
                    raise error(f"{key} is a group of fields ({', '.join(current)}); got {v!r}")
                fill(current, v, f"{key}.")
                continue
            if isinstance(v, list) and isinstance(current, tuple):
                v = tuple(v)
            try:
                node[k] = v
            except TypeError as e:
                raise error(f"{key}={v!r}: {' '.join(str(e).split())}") from None

    fill(out, given, prefix)
    return out


def check_types(config: ml_collections.ConfigDict) -> None:
    """ConfigDict keeps each field's type but lets any field be set to None; only the fields
    declared as placeholders (default None: ``server.lr``, ``model.overrides``) mean something
    when unset, so None anywhere else is refused here, naming the field and its type."""
    declared = flatten(default_config())
    optional = sorted(k for k, v in declared.items() if v is None)
    for key, value in flatten(config).items():
        default = declared.get(key)
        if value is None and default is not None:
            raise ConfigError(
                f"{key}=None: {key} takes a {type(default).__name__} (default {default!r}); "
                f"only {', '.join(optional)} can be unset (None)"
            )


class _FloatOrNoneParser(flags.FloatParser):
    """absl's float parser, plus ``None``: ``--config.server.lr=None`` unsets a float placeholder
    (:func:`check_types` refuses None for the fields that are not placeholders)."""

    def parse(self, argument: Any) -> float | None:
        if argument is None or (isinstance(argument, str) and argument.strip() == "None"):
            return None
        return super().parse(argument)


class _DictParser(flags.ArgumentParser):
    """A dict-typed field (``model.overrides``) from a Python dict literal, or ``None``."""

    def parse(self, argument: Any) -> dict | None:
        if argument is None or isinstance(argument, Mapping):
            return None if argument is None else dict(argument)
        try:
            value = ast.literal_eval(argument)
        except (SyntaxError, ValueError):
            value = argument
        if value is not None and not isinstance(value, dict):
            raise ValueError(
                f"{argument!r} is not a dict; write a Python dict literal, e.g. "
                "\"{'num_hidden_layers': 2}\" (quoted for the shell), or None"
            )
        return value

    def flag_type(self) -> str:
        return "dict"


# The field types ml_collections' --config.KEY=VALUE parses by itself.
CLI_TYPES = (bool, int, float, str, tuple)


def register_cli_parsers() -> None:
    """Makes every type :func:`default_config` declares settable with ``--config.KEY=VALUE``:
    ml_collections parses bool, int, float, str and tuple fields (a tuple as ``"('a', 'b')"``
    or the flag once per element), but not dict-typed fields, nor None for a float
    placeholder. Called when this module is imported, so ``spry_jax.main`` and
    ``spry_jax.study`` parse with it."""
    config_flags.register_flag_parser_for_type(float, _FloatOrNoneParser())
    config_flags.register_flag_parser_for_type(dict, _DictParser())


register_cli_parsers()


def closest_fields(key: str, fields: list[str] | None = None, n: int = 3) -> list[str]:
    """The declared fields (dotted) nearest to a misspelt ``key``, for "did you mean" lines."""
    if fields is None:
        fields = sorted(flatten(default_config()))
    close = difflib.get_close_matches(key, fields, n=n, cutoff=0.6)
    # A misspelt group (data.colums) is closest to its members, which difflib ranks low.
    groups = [f for f in fields if f.startswith(key.rsplit(".", 1)[0] + ".")]
    leaf = key.rsplit(".", 1)[-1]
    close += [f for f in groups if f not in close and leaf[:4] in f][: max(0, n - len(close))]
    return close[:n]


# Fields added with a default that does *not* reproduce what earlier code did, and the value
# that does: a record without the field describes a run with this value.
LEGACY_VALUES = {"model.dropout_bits": "threefry", "round.static_tangents": "off"}


def added_with_default(field: str, value: Any) -> bool:
    """True if a record written before ``field`` (dotted) existed describes the same experiment
    as ``value``: ``value`` is the field's legacy value (:data:`LEGACY_VALUES`, for a field whose
    default changed what runs do), or else its default in :func:`default_config` (a field
    otherwise is only ever added with the default that reproduces the old behaviour)."""
    if field in LEGACY_VALUES:
        return value == LEGACY_VALUES[field]
    defaults = flatten(default_config().to_dict())
    if field not in defaults:
        return False
    default = defaults[field]
    if isinstance(default, tuple):
        default = list(default)
    if isinstance(value, tuple):
        value = list(value)
    return value == default
