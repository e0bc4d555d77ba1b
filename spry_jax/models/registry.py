"""The model registry: architectures by transformers ``model_type``, and model names.

Two tables, one place per concern:

* :data:`ARCHITECTURES` maps a transformers ``model_type`` (``config.model_type``) to the
  ``"module:Class"`` that implements it. Imports are lazy so an entry never breaks importing
  the package.
* :data:`MODELS` maps a short name (``roberta-large``, ``tiny-bert``, ``minilm``, ...) to a
  :class:`ModelSpec`: the hub id, the architecture hyper-parameters (so the paper's models can
  be built with ``nnx.eval_shape`` and NO hub access), or an offline asset.

The contract of an architecture class ``Cls(nnx.Module)`` (encoders and decoders alike):

* ``Cls(config, *, task, num_labels, dtype, quant, pooling, rngs)`` with ``config`` a
  ``transformers.PretrainedConfig``, ``task`` in :data:`TASKS`, ``quant`` in
  ``quant.QUANT_MODES``, ``pooling`` "default" or "mean".
* ``__call__(input_ids, attention_mask, *, dropout_rng=None) -> logits``: classification
  ``[batch, num_labels]``; qa ``[batch, seq, 2]`` (start, end); causal_lm
  ``[batch, seq, vocab]``. ``dropout_rng=None`` = deterministic.
* optional ``uses_token_types: bool`` (False if missing): True when ``__call__`` takes a third
  argument ``token_type_ids`` (segment ids of text pairs) that changes its output (BERT,
  ALBERT); the SplitModel boundary passes a batch's ``token_type_ids`` only to such models.
* ``hf_key_to_path(key: str) -> str | None``: the flat ``"a/b/c"`` state path of a checkpoint
  tensor (None = not a weight of ours, e.g. a buffer or a tied ``lm_head``). The loader
  transposes 2-D tensors whose path ends in ``/kernel`` (torch ``[out, in]`` -> ``[in, out]``)
  and quantises them when the layer is quantised.
* ``head_prefixes: tuple[str, ...]``: state-path prefixes of the task head (may be missing from
  a checkpoint: it then keeps its random init; trainable in every PEFT method).
* class attributes ``LORA_TARGETS`` (regexes searched in Linear module paths; the family's
  default LoRA targets), ``IA3_TARGETS`` and ``IA3_FEEDFORWARD`` (IA3 scales the output of
  ``IA3_TARGETS`` and the input of ``IA3_FEEDFORWARD``).
* ``MODEL_ORDER``: a :class:`spry_jax.models.order.ModelOrder` placing every module that holds
  weights (before the layers, the per-layer sub-layer table, after), in the order transformers'
  PyTorch class lists them in ``named_parameters()``; Spry's units are chunks of this order
  (``tests/models/test_order.py`` checks it against the PyTorch model with PEFT's adapters).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

TASKS = ("classification", "qa", "causal_lm")

ARCHITECTURES: dict[str, str] = {
    "bert": "spry_jax.models.encoders:BertModel",
    "roberta": "spry_jax.models.encoders:BertModel",
    "distilbert": "spry_jax.models.encoders:DistilBertModel",
    "albert": "spry_jax.models.encoders:AlbertModel",
    # --- decoders (spry_jax/models/decoders.py): "opt" and "llama" entries go here ---
    "opt": "spry_jax.models.decoders:OPTForTask",
    "llama": "spry_jax.models.decoders:LlamaForTask",
    # --- end decoders ---
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A named model.

    Attributes:
      hub_id: Hugging Face hub id (None for asset-only models).
      config: HF config fields including ``model_type`` -- enough to build the architecture
        with no hub access (``transformers.AutoConfig.for_model(**config)``).
      asset: name for ``spry_jax.assets.fetch`` when the weights ship as an offline asset.
      gguf_file: file name inside the asset directory for GGUF assets.
    """

    hub_id: str | None = None
    config: dict[str, Any] | None = None
    asset: str | None = None
    gguf_file: str | None = None


_BERT_LARGE = dict(
    model_type="bert",
    vocab_size=30522,
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    intermediate_size=4096,
    hidden_act="gelu",
    max_position_embeddings=512,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
    pad_token_id=0,
)
_BERT_BASE = dict(
    _BERT_LARGE,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
)

# --- decoders: OPT-6.7B hyper-parameters (facebook/opt-6.7b config.json), shared by opt-13b ---
_OPT_6_7B = dict(
    model_type="opt",
    vocab_size=50272,
    hidden_size=4096,
    word_embed_proj_dim=4096,
    ffn_dim=16384,
    num_hidden_layers=32,
    num_attention_heads=32,
    activation_function="relu",
    max_position_embeddings=2048,
    do_layer_norm_before=True,
    dropout=0.1,
    attention_dropout=0.0,
    enable_bias=True,
    pad_token_id=1,
    bos_token_id=2,
    eos_token_id=2,
)
# --- end decoders ---

MODELS: dict[str, ModelSpec] = {
    # --- encoders ---
    "roberta-large": ModelSpec(
        hub_id="FacebookAI/roberta-large",
        config=dict(
            model_type="roberta",
            vocab_size=50265,
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            hidden_act="gelu",
            max_position_embeddings=514,
            type_vocab_size=1,
            layer_norm_eps=1e-5,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        ),
    ),
    "bert-large": ModelSpec(hub_id="google-bert/bert-large-uncased", config=_BERT_LARGE),
    "bert-base": ModelSpec(hub_id="google-bert/bert-base-uncased", config=_BERT_BASE),
    "distilbert-base": ModelSpec(
        hub_id="distilbert/distilbert-base-uncased",
        config=dict(
            model_type="distilbert",
            vocab_size=30522,
            dim=768,
            n_layers=6,
            n_heads=12,
            hidden_dim=3072,
            activation="gelu",
            max_position_embeddings=512,
            sinusoidal_pos_embds=False,
            pad_token_id=0,
        ),
    ),
    "albert-large": ModelSpec(
        hub_id="albert/albert-large-v2",
        config=dict(
            model_type="albert",
            vocab_size=30000,
            embedding_size=128,
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            hidden_act="gelu_new",
            max_position_embeddings=512,
            type_vocab_size=2,
            num_hidden_groups=1,
            inner_group_num=1,
            layer_norm_eps=1e-12,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        ),
    ),
    "tiny-bert": ModelSpec(
        config=dict(
            model_type="bert",
            vocab_size=128,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            hidden_act="gelu",
            max_position_embeddings=128,
            type_vocab_size=2,
            pad_token_id=0,
        )
    ),
    "minilm": ModelSpec(
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
        config=dict(
            model_type="bert",
            vocab_size=30522,
            hidden_size=384,
            num_hidden_layers=6,
            num_attention_heads=12,
            intermediate_size=1536,
            hidden_act="gelu",
            max_position_embeddings=512,
            type_vocab_size=2,
            layer_norm_eps=1e-12,
            pad_token_id=0,
        ),
        asset="minilm",
    ),
    # --- decoders (spry_jax/models/decoders.py): llama2-7b, opt-6.7b, opt-13b, smollm2 go here ---
    # Hyper-parameters as in each hub id's config.json.
    "llama2-7b": ModelSpec(
        hub_id="meta-llama/Llama-2-7b-hf",
        config=dict(
            model_type="llama",
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            hidden_act="silu",
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "opt-6.7b": ModelSpec(hub_id="facebook/opt-6.7b", config=_OPT_6_7B),
    "opt-13b": ModelSpec(
        hub_id="facebook/opt-13b",
        config=dict(
            _OPT_6_7B,
            hidden_size=5120,
            word_embed_proj_dim=5120,
            ffn_dim=20480,
            num_hidden_layers=40,
            num_attention_heads=40,
        ),
    ),
    "smollm2": ModelSpec(
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        config=dict(
            model_type="llama",
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            hidden_act="silu",
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            rope_theta=100000.0,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
        ),
        asset="smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    # --- end decoders ---
}


def get_spec(name: str) -> ModelSpec | None:
    """The :class:`ModelSpec` registered under a short name or hub id, else None."""
    if name in MODELS:
        return MODELS[name]
    hub_ids = {spec.hub_id: spec for spec in MODELS.values() if spec.hub_id}
    return hub_ids.get(name)


def get_architecture(model_type: str) -> type:
    """The architecture class registered for a transformers ``model_type``."""
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"Unknown architecture model_type={model_type!r}; supported: "
            f"{sorted(ARCHITECTURES)}. Register a new family in spry_jax/models/registry.py."
        )
    module_name, cls_name = ARCHITECTURES[model_type].split(":")
    return getattr(importlib.import_module(module_name), cls_name)
