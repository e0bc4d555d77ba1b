"""Loading models: names -> local files -> config -> Flax NNX module with checkpoint weights.

Where a name goes (first match wins):

1. an existing local directory (``config.json`` + ``*.safetensors``) or ``.gguf`` file;
2. a registry name or hub id whose weights ship as an offline asset (``minilm``, ``smollm2``,
   fetched with :func:`spry_jax.assets.fetch`);
3. a hub id (``FacebookAI/roberta-large``; registry names map to their hub id): the local HF
   cache first (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``),
   then a download when the hub is reachable. With ``HF_HUB_OFFLINE=1`` or no network this
   fails at once with an error naming the offline options (no retry hang).

Weights are read tensor by tensor with ``safetensors`` (no torch); each is transposed to the
``[in, out]`` kernel layout and, for a quantised base, quantised before the next is read, so a
full-precision copy of all weights never exists. PyTorch pickles (``*.bin``) are refused unless
``allow_pickle=True``. The module is first built with ``nnx.eval_shape`` (no memory), then its
state is filled; every tensor is shape-checked and every weight of the module must be found,
except the task head, which keeps a fresh random init when the checkpoint has none.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import socket
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spry_jax import config as config_lib
from spry_jax.models import gptq as gptq_lib
from spry_jax.models import layers, registry
from spry_jax.models.layers import Linear
from spry_jax.models.peft import (
    PeftConfig,
    apply_peft,
    as_peft_config,
    iter_modules,
    path_str,
    split_model,
)
from spry_jax.models.quant import check_quant, quantize
from spry_jax.types import SplitModel

log = logging.getLogger(__name__)

_HUB_PATTERNS = [
    "config.json",
    "quantize_config.json",  # AutoGPTQ's GPTQ parameters (spry_jax.models.gptq)
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "*.model",
]
_DROPOUT_FIELDS = (
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "dropout",
    "attention_dropout",
)
# The names are declared once, with the config field they are checked against (model.dtype).
_DTYPES = {name: jnp.dtype(name) for name in config_lib.MODEL_DTYPES}


class HubUnavailableError(OSError):
    """A hub name was asked for, it is not in the local cache, and the hub cannot be reached."""


def as_dtype(dtype: Any) -> jnp.dtype:
    """``"float32"``/``"bfloat16"``/``"float16"`` or a dtype -> a jnp dtype (only those three
    are supported: the frozen base and activations; trainable weights stay float32)."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; use one of {sorted(_DTYPES)}.")
        return jnp.dtype(_DTYPES[dtype])
    d = jnp.dtype(dtype)
    if d not in _DTYPES.values():
        raise ValueError(f"dtype={d} is not supported; use one of {sorted(_DTYPES)}.")
    return d


def hub_cache_dir() -> pathlib.Path:
    """The HF hub cache, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return pathlib.Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache", "huggingface"
    )
    return pathlib.Path(home) / "hub"


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable(timeout: float = 3.0) -> bool:
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_message(name: str, repo_id: str, why: str) -> str:
    return (
        f"Cannot load {name!r}: hub repo {repo_id!r} is not in the local HF cache "
        f"({hub_cache_dir()}) and {why}. Offline options: (1) pass a local directory holding "
        "config.json and model.safetensors (e.g. from save_pretrained); (2) place the repo in "
        "the HF cache (models--ORG--NAME/snapshots/<rev>/ with refs/main) and point "
        "HF_HUB_CACHE or HF_HOME at it; (3) use the offline assets 'minilm' (BERT, "
        "all-MiniLM-L6-v2) or 'smollm2' (Llama, SmolLM2-135M GGUF); (4) build without weights: "
        "pretrained=False / abstract_model(name) for registry names."
    )


def _is_gguf(path: pathlib.Path) -> bool:
    if path.is_file():
        return path.suffix == ".gguf"
    return path.is_dir() and not (path / "config.json").exists() and any(path.glob("*.gguf"))


def resolve(name_or_path: str | os.PathLike) -> pathlib.Path:
    """The local directory (or ``.gguf`` file) holding ``name_or_path``'s files.

    Raises:
      FileNotFoundError: a registry name with no weights (e.g. ``tiny-bert``).
      HubUnavailableError: a hub id not cached locally while the hub is unreachable/offline.
    """
    name = os.fspath(name_or_path)
    local = pathlib.Path(name).expanduser()
    if local.exists():
        return local
    spec = registry.get_spec(name)
    if spec is not None and spec.asset:
        from spry_jax import assets

        return assets.fetch(spec.asset)
    if spec is not None and not spec.hub_id:
        raise FileNotFoundError(
            f"{name!r} is a registry model with no pretrained weights; build it with "
            "pretrained=False (make_split_model) or abstract_model()."
        )
    repo_id = spec.hub_id if spec is not None else name
    if name.startswith((".", "/", "~")) or repo_id.count("/") > 1:
        raise FileNotFoundError(f"Local path {name!r} does not exist.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        return pathlib.Path(
            snapshot_download(
                repo_id, cache_dir=cache, local_files_only=True, allow_patterns=_HUB_PATTERNS
            )
        )
    except LocalEntryNotFoundError:
        pass
    if _offline_env():
        raise HubUnavailableError(_offline_message(name, repo_id, "HF_HUB_OFFLINE is set"))
    if not _hub_reachable():
        raise HubUnavailableError(_offline_message(name, repo_id, "the hub is unreachable"))
    return pathlib.Path(snapshot_download(repo_id, cache_dir=cache, allow_patterns=_HUB_PATTERNS))


def _apply_overrides(config, overrides: Mapping[str, Any] | None, dropout: float | None):
    known = config.to_dict()
    for key, value in dict(overrides or {}).items():
        if key not in known:
            raise ValueError(
                f"overrides[{key!r}] is not a field of the {config.model_type} config; "
                f"fields include {sorted(known)[:12]}..."
            )
        setattr(config, key, value)
    if dropout is not None:
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        for field in _DROPOUT_FIELDS:
            if field in known:
                setattr(config, field, float(dropout))
    return config


def load_config(
    name_or_path: str | os.PathLike,
    overrides: Mapping[str, Any] | None = None,
    *,
    dropout: float | None = None,
    prefer_registry: bool = False,
):
    """The transformers config of a model (``AutoConfig``), with ``overrides`` applied.

    With ``prefer_registry`` a registry name is built from its stored hyper-parameters (no hub
    access); otherwise the config comes from the model's files.
    """
    import transformers

    name = os.fspath(name_or_path)
    spec = registry.get_spec(name)
    if spec is not None and spec.config and (prefer_registry or not spec.hub_id and not spec.asset):
        config = transformers.AutoConfig.for_model(**spec.config)
    else:
        src = resolve(name)
        if _is_gguf(src):
            from spry_jax.models import gguf_loader

            config = gguf_loader.read_gguf_config(src)
        else:
            if not (src / "config.json").exists():
                raise FileNotFoundError(f"{src} has no config.json.")
            config = transformers.AutoConfig.from_pretrained(str(src))
    return _apply_overrides(config, overrides, dropout)


def build_model(
    config,
    *,
    task: str = "classification",
    num_labels: int = 2,
    dtype: Any = jnp.float32,
    quant: str = "none",
    pooling: str = "default",
    seed: int = 0,
    abstract: bool = False,
) -> nnx.Module:
    """The registered architecture for ``config.model_type``, randomly initialised.

    With ``abstract`` it is built by ``nnx.eval_shape``: shapes only, no memory.
    """
    if task not in registry.TASKS:
        raise ValueError(f"task={task!r} is not supported; use one of {registry.TASKS}.")
    cls = registry.get_architecture(config.model_type)
    check_quant(quant)
    kwargs = dict(
        task=task, num_labels=num_labels, dtype=as_dtype(dtype), quant=quant, pooling=pooling
    )
    if abstract:
        return nnx.eval_shape(lambda: cls(config, **kwargs, rngs=nnx.Rngs(seed)))
    return cls(config, **kwargs, rngs=nnx.Rngs(seed))


def _checkpoint_files(src: pathlib.Path, allow_pickle: bool) -> tuple[str, list[pathlib.Path]]:
    index = src / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [src / s for s in shards]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {missing}.")
        return "safetensors", files
    single = src / "model.safetensors"
    if single.exists():
        return "safetensors", [single]
    others = sorted(src.glob("*.safetensors"))
    if others:
        return "safetensors", others
    pickles = sorted(src.glob("pytorch_model*.bin"))
    if pickles:
        if not allow_pickle:
            raise ValueError(
                f"{src} holds only PyTorch pickle weights ({pickles[0].name}); pickles can run "
                "code when loaded and are refused by default. Convert them to safetensors, or "
                "pass allow_pickle=True (loads with torch.load(weights_only=True); needs torch)."
            )
        return "pickle", pickles
    raise FileNotFoundError(
        f"No weights in {src}: expected model.safetensors (or a sharded "
        "model.safetensors.index.json; pytorch_model.bin only with allow_pickle=True)."
    )


def iter_checkpoint(
    src: pathlib.Path, allow_pickle: bool = False
) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, array)`` for every tensor of a checkpoint directory, one at a time."""
    kind, files = _checkpoint_files(src, allow_pickle)
    if kind == "pickle":
        import torch

        for f in files:
            for key, t in torch.load(f, map_location="cpu", weights_only=True).items():
                yield key, t.float().numpy() if t.is_floating_point() else t.numpy()
        return
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), framework="numpy") as handle:
            for key in handle.keys():
                try:
                    yield key, handle.get_tensor(key)
                except TypeError:
                    # numpy has no bfloat16: read through jax, which hands back ml_dtypes arrays.
                    with safe_open(str(f), framework="flax") as jhandle:
                        yield key, np.asarray(jhandle.get_tensor(key))


def _resolve_leaf(path: str, known: Mapping[str, Any]) -> str:
    parent, _, leaf = path.rpartition("/")
    if leaf != "weight":
        return path
    for cand in ("kernel", "scale", "embedding"):
        full = f"{parent}/{cand}" if parent else cand
        if full in known:
            return full
    return path


def load_weights(
    model: nnx.Module,
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    source: str = "checkpoint",
    seed: int = 0,
    initializer_range: float = 0.02,
    gptq: gptq_lib.GPTQConfig | None = None,
) -> nnx.Module:
    """Fills an (abstract) model from checkpoint tensors and returns the concrete model.

    Args:
      model: built by :func:`build_model` (abstract or not).
      tensors: ``(checkpoint name, array in torch layout)`` pairs.
      source: named in error messages.
      seed: seeds the task head when the checkpoint has none.
      initializer_range: std of that head's normal init (transformers' default 0.02).
      gptq: the checkpoint's GPTQ parameters (:mod:`spry_jax.models.gptq`); its Linear layers
        stored as ``qweight``/``qzeros``/``scales``/``g_idx`` become int4 kernels (the model
        must be built with quant="int4"; float Linear weights are rounded to int4 as usual).

    Raises:
      ValueError: a tensor whose shape does not match (named), or weights missing from the
        checkpoint (named).
    """
    graphdef, state = nnx.split(model)
    flat = {path_str(p): (p, v) for p, v in nnx.to_flat_state(state)}
    linears = {p: m for p, m in iter_modules(model) if isinstance(m, Linear)}
    head = tuple(getattr(model, "head_prefixes", ()))
    values: dict[str, Any] = {}
    unused: list[str] = []
    pending: dict[str, dict[str, np.ndarray]] = {}
    names: dict[str, str] = {}
    int4: dict[str, gptq_lib.Int4Kernel] = {}

    def finish(parent: str) -> None:
        lin, parts = linears[parent], pending.pop(parent)
        k = gptq_lib.to_int4(parts, gptq, lin.in_features, lin.out_features, names[parent])
        int4[parent] = k
        values[f"{parent}/kernel"], values[f"{parent}/kernel_scale"] = k.codes, k.scale

    for key, arr in tensors:
        split = gptq_lib.split_key(key) if gptq is not None else None
        if split is not None:
            base, part = split
            path = model.hf_key_to_path(f"{base}.weight")
            path = None if path is None else _resolve_leaf(path, flat)
            parent, _, leaf = (path or "").rpartition("/")
            if parent not in linears or leaf != "kernel":
                unused.append(key)
                continue
            if linears[parent].quant != "int4":
                raise ValueError(f"{key!r} is GPTQ-quantised but {parent} is not an int4 layer.")
            pending.setdefault(parent, {})[part] = np.asarray(arr)
            names[parent] = base
            if len(pending[parent]) == len(gptq_lib.PARTS):
                finish(parent)
            continue
        path = model.hf_key_to_path(key)
        if path is None:
            continue
        path = _resolve_leaf(path, flat)
        if path not in flat:
            unused.append(key)
            continue
        parent, _, leaf = path.rpartition("/")
        lin = linears.get(parent)
        if lin is not None and leaf == "kernel":
            want = (lin.out_features, lin.in_features)
            if tuple(arr.shape) != want:
                raise ValueError(
                    f"Tensor {key!r} in {source} has shape {tuple(arr.shape)} but {path} expects "
                    f"{want} (torch layout [out, in]); the config does not match the weights."
                )
            w = np.ascontiguousarray(np.asarray(arr, np.float32).T)
            if lin.quant != "none":
                q, s = quantize(w, lin.quant, lin.group_size)
                values[path], values[f"{parent}/kernel_scale"] = q, s
            else:
                values[path] = w.astype(lin.dtype)
            continue
        target = flat[path][1]
        if tuple(arr.shape) != tuple(target.shape):
            raise ValueError(
                f"Tensor {key!r} in {source} has shape {tuple(arr.shape)} but {path} expects "
                f"{tuple(target.shape)}; the config does not match the weights."
            )
        values[path] = np.asarray(arr).astype(target.dtype)
    for parent in list(pending):
        finish(parent)  # layers stored without g_idx (allowed without act-order)
    if unused:
        log.info(
            "Ignored %d tensors of %s not used by the model: %s", len(unused), source, unused[:8]
        )
    missing = [p for p in flat if p not in values]
    body_missing = [p for p in missing if not any(p == h or p.startswith(h + "/") for h in head)]
    if body_missing:
        hint = ""
        if any(p.startswith("pooler/") for p in body_missing):
            hint = " (this checkpoint has no pooler: try pooling='mean')"
        raise ValueError(
            f"{source} lacks {len(body_missing)} weight(s) the model needs, e.g. "
            f"{body_missing[:5]}{hint}."
        )
    key = jax.random.key(seed)
    for i, p in enumerate(missing):
        var = flat[p][1]
        if p.endswith("/bias"):
            values[p] = jnp.zeros(var.shape, var.dtype)
        elif p.endswith("/scale"):
            values[p] = jnp.ones(var.shape, var.dtype)
        else:
            draw = jax.random.normal(jax.random.fold_in(key, i), var.shape, jnp.float32)
            values[p] = (draw * initializer_range).astype(var.dtype)
    if missing:
        log.info("Task head initialised randomly (not in %s): %s", source, missing)
    new_state = nnx.from_flat_state(
        [(pt, v.replace(jnp.asarray(values[k]))) for k, (pt, v) in flat.items()]
    )
    merged = nnx.merge(graphdef, new_state)
    if int4:
        by_path = dict(iter_modules(merged))
        for parent, k in int4.items():
            lin = by_path[parent]
            lin.set_int4(
                lin.kernel[...],
                lin.kernel_scale[...],
                group=k.group,
                zero=None if k.zero is None else jnp.asarray(k.zero),
                perm=None if k.perm is None else jnp.asarray(k.perm),
            )
        log.info("Loaded %d GPTQ int4 layers from %s.", len(int4), source)
    return merged


def from_pretrained(
    name_or_path: str | os.PathLike,
    task: str = "classification",
    num_labels: int = 2,
    dtype: Any = jnp.float32,
    quant: str = "none",
    allow_pickle: bool = False,
    peft: PeftConfig | Mapping[str, Any] | None = None,
    seed: int = 0,
    *,
    pooling: str = "default",
    overrides: Mapping[str, Any] | None = None,
    dropout: float | None = None,
) -> nnx.Module:
    """A pretrained model as a Flax NNX module; ``model(input_ids, attention_mask)`` -> logits.

    Args:
      name_or_path: local directory, ``.gguf`` file, registry name (``minilm``, ``smollm2``,
        ``roberta-large``, ...) or hub id (see the module docstring for the lookup order).
      task: "classification" (``[batch, num_labels]``), "qa" (``[batch, seq, 2]``: start, end)
        or "causal_lm" (``[batch, seq, vocab]``; decoders).
      num_labels: classes for classification.
      dtype: "float32"/"bfloat16"/"float16" (or a dtype): storage of the frozen float weights and the
        activation dtype. The head and PEFT weights stay float32.
      quant: "none", "int8" or "int4": weight-only quantised Linear kernels (frozen base).
        A GPTQ checkpoint (``quantization_config`` in config.json, or quantize_config.json) is
        loaded as the int4 base from its packed codes (:mod:`spry_jax.models.gptq`), with
        "none" or "int4"; its float Linear weights, if any, are rounded to int4.
      allow_pickle: accept PyTorch ``.bin`` pickles (needs torch).
      peft: a PEFT config; the returned model is already adapted (:func:`apply_peft`).
      seed: seeds the task head (when new) and the LoRA A matrices.
      pooling: "default" (the family's head) or "mean" (mean over non-padding tokens, then a
        linear classifier).
      overrides: HF config fields to change (e.g. ``classifier_dropout``).
      dropout: overrides hidden and attention dropout rates.
    """
    import transformers

    src = resolve(name_or_path)
    if _is_gguf(src):
        from spry_jax.models import gguf_loader

        config, state_dict = gguf_loader.load_gguf(src)
        tensors: Iterable[tuple[str, np.ndarray]] = state_dict.items()
    else:
        if not (src / "config.json").exists():
            raise FileNotFoundError(f"{src} has no config.json (needed to build the model).")
        config = transformers.AutoConfig.from_pretrained(str(src))
        tensors = iter_checkpoint(src, allow_pickle)
    gptq = None if _is_gguf(src) else gptq_lib.read_config(src, config)
    if gptq is not None:
        if quant not in ("none", "int4"):
            raise ValueError(
                f"quant={quant!r} cannot be applied to {src}: it is a GPTQ 4-bit checkpoint, "
                "loaded as the int4 base; pass quant='int4' or leave the default."
            )
        quant = "int4"
    config = _apply_overrides(config, overrides, dropout)
    model = build_model(
        config,
        task=task,
        num_labels=num_labels,
        dtype=dtype,
        quant=quant,
        pooling=pooling,
        seed=seed,
        abstract=True,
    )
    model = load_weights(
        model,
        tensors,
        source=str(src),
        seed=seed,
        initializer_range=float(getattr(config, "initializer_range", 0.02) or 0.02),
        gptq=gptq,
    )
    if peft is not None:
        apply_peft(model, peft, seed=seed)
    return model


def abstract_model(
    name: str,
    task: str = "classification",
    num_labels: int = 2,
    dtype: Any = jnp.float32,
    quant: str = "none",
    *,
    pooling: str = "default",
    overrides: Mapping[str, Any] | None = None,
    peft: PeftConfig | Mapping[str, Any] | None = None,
) -> nnx.Module:
    """A model with shapes only (``nnx.eval_shape``), from the registry's hyper-parameters.

    Builds the paper's models (``roberta-large``, ``llama2-7b``, ``opt-13b``, ...) with no hub
    access and no weight memory, e.g. to lower a step with ``jax.ShapeDtypeStruct`` arguments
    and read its XLA memory analysis. Non-registry names read their config from files.
    """
    config = load_config(name, overrides, prefer_registry=True)
    cls = registry.get_architecture(config.model_type)
    kwargs = dict(
        task=task,
        num_labels=num_labels,
        dtype=as_dtype(dtype),
        quant=check_quant(quant),
        pooling=pooling,
    )

    def make():
        model = cls(config, **kwargs, rngs=nnx.Rngs(0))
        if peft is not None:
            apply_peft(model, peft)
        return model

    return nnx.eval_shape(make)


def load_tokenizer(name_or_path: str | os.PathLike):
    """The model's tokenizer (``transformers.AutoTokenizer``), with padding and truncation left
    to the caller (the MiniLM ``tokenizer.json`` pads/truncates to 128 by itself)."""
    import transformers

    src = resolve(name_or_path)
    if _is_gguf(src):
        from spry_jax.models import gguf_loader

        return gguf_loader.load_gguf_tokenizer(src)
    tok = transformers.AutoTokenizer.from_pretrained(str(src))
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        backend.no_padding()
        backend.no_truncation()
    return tok


def make_split_model(
    model_cfg: Any,
    peft_cfg: Any,
    *,
    task: str = "classification",
    num_labels: int = 2,
    seed: int = 0,
    remat: str = "none",
    lazy_dequant: bool = False,
    cut_cotangents: bool = False,
) -> SplitModel:
    """Builds the model a config describes and splits it into trainable and frozen parts.

    Args:
      model_cfg: ConfigDict (or dict; a field left out takes its ``default_config().model``
        default, :func:`spry_jax.config.complete`) with fields
        ``name`` -- registry alias (``tiny-bert``, ``minilm``, ``roberta-large``, ...), hub id
        or local directory;
        ``pretrained`` -- True: load the weights; False: random init from the config alone
        (registry hyper-parameters, no hub access for registry names);
        ``dtype`` -- "float32" | "bfloat16" | "float16" (frozen weights and activations);
        ``quant`` -- "none" | "int8" | "int4" (weight-only quantised frozen Linear kernels);
        ``dropout`` -- overrides hidden and attention dropout (e.g. 0.1);
        ``overrides`` -- dict of HF-config overrides (e.g. to make a tiny model);
        ``pooling`` -- "default" (the family's head) | "mean" (mean over non-padding tokens,
        then a linear classifier; suits sentence-transformer checkpoints such as MiniLM).
      peft_cfg: ConfigDict/dict/PeftConfig with ``method`` ("lora" | "ia3" | "bitfit" | "head"),
        ``lora_rank``, ``lora_alpha``, ``lora_dropout``, ``target_modules`` (list of regexes;
        empty = the family's default).
      task: "classification" | "qa" | "causal_lm".
      num_labels: classes for classification.
      seed: seeds random init, the head and LoRA A.
      remat: how backprop through the model stores activations (the method row's ``remat``,
        :func:`spry_jax.methods.model_options`): ``"none"``; ``"layer"``, a ``jax.checkpoint``
        per transformer layer (MeBP); ``"lora"``, each LoRA ``xA`` recomputed in the backward
        pass (MeSP). Values and gradients do not change
        (:func:`spry_jax.models.layers.set_build_options`).
      lazy_dequant: a quantised base is dequantised again in the backward pass instead of kept
        in float (every backprop row); not jvp-safe, so never for forward-gradient rows.
      cut_cotangents: each layer's output cotangent is materialised once in the backward pass
        (:func:`spry_jax.models.layers.cut_cotangent`; every backprop row); not jvp-safe.

    Returns:
      The :class:`spry_jax.types.SplitModel` (trainable = PEFT leaves + head, in model order).
    """

    model_cfg = config_lib.complete(model_cfg, "model")  # left-out fields: their declared default
    name = model_cfg.name
    if not name:
        raise ValueError("model.name is required (a registry alias, hub id or local directory).")
    layers.check_remat(remat)
    peft = as_peft_config(peft_cfg)
    overrides = model_cfg.overrides or {}
    if hasattr(overrides, "to_dict"):
        overrides = overrides.to_dict()
    common = dict(
        task=task,
        num_labels=num_labels,
        dtype=model_cfg.dtype,
        quant=model_cfg.quant,
        pooling=model_cfg.pooling,
    )
    dropout = model_cfg.dropout
    if model_cfg.pretrained:
        model = from_pretrained(
            name, **common, peft=peft, seed=seed, overrides=overrides, dropout=dropout
        )
    else:
        config = load_config(name, overrides, dropout=dropout, prefer_registry=True)
        model = build_model(config, **common, seed=seed)
        apply_peft(model, peft, seed=seed)
    layers.set_build_options(
        model, remat=remat, lazy_dequant=lazy_dequant, cut_cotangents=cut_cotangents
    )
    return split_model(model, peft)
