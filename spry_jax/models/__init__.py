"""Flax NNX language models with Hugging Face weights, PEFT and a quantised frozen base.

Public API::

    from_pretrained(name_or_path, task=..., num_labels=..., dtype=..., quant=..., peft=...)
    make_split_model(model_cfg, peft_cfg, task=..., num_labels=..., seed=...,
                     remat="none" | "layer" | "lora", lazy_dequant=False,
                     cut_cotangents=False) -> SplitModel
    set_build_options(model, remat=..., lazy_dequant=..., cut_cotangents=...)  # on a built model
    split_model(model, peft_cfg) -> SplitModel
    abstract_model(name, ...)      # shapes only, from the registry (no hub, no memory)
    load_tokenizer(name_or_path)
    apply_peft(model, peft_cfg), PeftConfig, trainable_paths(model, peft_cfg)
"""

from spry_jax.models.layers import REMAT_MODES, set_build_options
from spry_jax.models.loading import (
    HubUnavailableError,
    abstract_model,
    build_model,
    from_pretrained,
    load_config,
    load_tokenizer,
    load_weights,
    make_split_model,
    resolve,
)
from spry_jax.models.peft import (
    METHODS,
    PeftConfig,
    apply_peft,
    as_peft_config,
    split_model,
    trainable_paths,
)
from spry_jax.models.registry import ARCHITECTURES, MODELS, TASKS

__all__ = [
    "ARCHITECTURES",
    "METHODS",
    "MODELS",
    "REMAT_MODES",
    "TASKS",
    "HubUnavailableError",
    "PeftConfig",
    "abstract_model",
    "apply_peft",
    "as_peft_config",
    "build_model",
    "from_pretrained",
    "load_config",
    "load_tokenizer",
    "load_weights",
    "make_split_model",
    "resolve",
    "set_build_options",
    "split_model",
    "trainable_paths",
]
