"""Encoders: BERT, RoBERTa, DistilBERT and ALBERT (shared layer weights), in Flax NNX.

State paths mirror transformers' module names (``encoder/layer/0/attention/self/query``), so
checkpoint tensors map by renaming ``.`` to ``/`` and dropping the family prefix (``bert.``,
``roberta.``, ...), and PEFT target patterns read like PEFT's. The numerics follow
transformers' PyTorch implementations (eager attention; post-LayerNorm residual blocks).
Token type (segment) ids are an optional third input: sentence pairs (NLI, MultiRC) mark the
second text with 1 for BERT and ALBERT; absent, they are all zero, as transformers fills them.
Models with a single segment type (RoBERTa) or none (DistilBERT) report ``uses_token_types``
False, and the SplitModel boundary does not pass segment ids to them.

Every class follows the architecture contract of :mod:`spry_jax.models.registry`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spry_jax.models import heads
from spry_jax.models.layers import (
    Embedding,
    LayerNorm,
    Linear,
    activation,
    dot_product_attention,
    dropout,
    fold_rng,
    make_attention_mask,
    maybe_remat,
)
from spry_jax.models.order import ModelOrder
from spry_jax.models.registry import TASKS

Array = jax.Array


class Node(nnx.Module):
    """A named container mirroring a transformers submodule, so state paths match its names."""

    def __init__(self, children: dict[str, Any]):
        for name, child in children.items():
            setattr(self, name, child)


def node(**children: Any) -> Node:
    """``Node`` from keyword children (allows the child name ``self``, as BERT uses)."""
    return Node(children)


def _self_attention(
    q_lin: Linear,
    k_lin: Linear,
    v_lin: Linear,
    x: Array,
    mask: Array,
    num_heads: int,
    attn_dropout: float,
    rng: Array | None,
) -> Array:
    """Multi-head self-attention context ``[batch, seq, hidden]`` (before the output dense)."""
    b, t, _ = x.shape
    q = q_lin(x, dropout_rng=fold_rng(rng, 0))
    k = k_lin(x, dropout_rng=fold_rng(rng, 1))
    v = v_lin(x, dropout_rng=fold_rng(rng, 2))
    split = lambda y: y.reshape(b, t, num_heads, -1)  # noqa: E731
    ctx = dot_product_attention(
        split(q),
        split(k),
        split(v),
        mask,
        dropout_rate=attn_dropout,
        dropout_rng=fold_rng(rng, 3),
    )
    return ctx.reshape(b, t, -1)


class EncoderBase(nnx.Module):
    """Shared head logic: subclasses build ``self`` backbone parts and implement ``encode``."""

    LORA_TARGETS: tuple[str, ...] = (r"(^|/)query$", r"(^|/)value$")
    IA3_TARGETS: tuple[str, ...] = (r"(^|/)key$", r"(^|/)value$")
    IA3_FEEDFORWARD: tuple[str, ...] = (r"layer/\d+/output/dense$",)
    HF_PREFIXES: tuple[str, ...] = ()
    HF_IGNORED_PREFIXES: tuple[str, ...] = ("cls.", "lm_head.", "predictions.", "sop_classifier.")

    def _init_common(self, config, task: str, num_labels: int, pooling: str, dtype) -> None:
        if task not in TASKS:
            raise ValueError(f"task={task!r} is not supported; use one of {TASKS}.")
        if task == "causal_lm":
            raise ValueError(
                f"task='causal_lm' needs a decoder; {config.model_type} is an encoder "
                "(use 'classification' or 'qa', or a decoder such as opt / llama)."
            )
        if task == "qa":
            num_labels = 2
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}.")
        self.model_type = config.model_type
        self.task = task
        self.num_labels = int(num_labels)
        self.pooling = heads.check_pooling(pooling)
        self.dtype = jnp.dtype(dtype)
        # Build option (layers.set_build_options): a jax.checkpoint per transformer layer.
        self.layer_remat = False
        # Build option: each layer's output through layers.cut_cotangent (backprop rows).
        self.layer_cut = False

    @property
    def head_prefixes(self) -> tuple[str, ...]:
        """State-path prefixes of the task head (trainable in every PEFT method)."""
        if self.task == "qa":
            return ("qa_outputs",)
        return ("classifier",)

    def hf_key_to_path(self, key: str) -> str | None:
        """The state path of checkpoint tensor ``key`` (None = not one of our weights)."""
        if key.startswith(self.HF_IGNORED_PREFIXES) or key.endswith(
            ("position_ids", "token_type_ids")
        ):
            return None
        for prefix in self.HF_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        return key.replace(".", "/")

    @property
    def uses_token_types(self) -> bool:
        """Whether segment ids change the output (a token-type table with more than one row)."""
        return getattr(self, "type_vocab_size", 0) > 1

    def encode(
        self,
        input_ids: Array,
        attention_mask: Array,
        rng: Array | None,
        token_type_ids: Array | None = None,
    ) -> Array:
        raise NotImplementedError

    def _classify(self, hidden: Array, attention_mask: Array, rng: Array | None) -> Array:
        """The family's classification head on ``hidden``; overridden where it differs."""
        raise NotImplementedError

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array,
        token_type_ids: Array | None = None,
        *,
        dropout_rng: Array | None = None,
    ) -> Array:
        """Logits: ``[batch, num_labels]`` (classification) or ``[batch, seq, 2]`` (qa).

        ``token_type_ids`` (``[batch, seq]``, None = all zero) are the segment ids of a text
        pair, as transformers' ``token_type_ids``.
        """
        input_ids = jnp.asarray(input_ids, jnp.int32)
        attention_mask = jnp.asarray(attention_mask, jnp.int32)
        if token_type_ids is not None:
            token_type_ids = jnp.asarray(token_type_ids, jnp.int32)
            if token_type_ids.shape != input_ids.shape:
                raise ValueError(
                    f"token_type_ids has shape {token_type_ids.shape}, input_ids "
                    f"{input_ids.shape}; they must match."
                )
        hidden = self.encode(input_ids, attention_mask, fold_rng(dropout_rng, 0), token_type_ids)
        head_rng = fold_rng(dropout_rng, 1)
        if self.task == "qa":
            return self._qa(hidden, head_rng)
        if self.pooling == "mean":
            pooled = heads.mean_pool(hidden.astype(jnp.float32), attention_mask)
            pooled = dropout(pooled, self.classifier_dropout, head_rng)
            return self.classifier(pooled)
        return self._classify(hidden, attention_mask, head_rng).astype(jnp.float32)

    def _qa(self, hidden: Array, rng: Array | None) -> Array:
        return heads.qa_logits(self.qa_outputs, hidden)


class BertModel(EncoderBase):
    """BERT and RoBERTa (``config.model_type`` "bert" or "roberta").

    RoBERTa differs in its position ids (counted from ``pad_token_id + 1`` over non-padding
    tokens) and its classification head (dense + tanh + out_proj, no pooler).
    """

    _LAYER = (
        "attention/self/query",
        "attention/self/key",
        "attention/self/value",
        "attention/output/dense",
        "attention/output/LayerNorm",
        "intermediate/dense",
        "output/dense",
        "output/LayerNorm",
    )
    _HEADS = ("classifier", "classifier/dense", "classifier/out_proj", "qa_outputs")
    BERT_ORDER = ModelOrder(
        before=(
            "embeddings/word_embeddings",
            "embeddings/position_embeddings",
            "embeddings/token_type_embeddings",
            "embeddings/LayerNorm",
        ),
        layers="encoder/layer/{}",
        sublayers=_LAYER,
        after=("pooler/dense", *_HEADS),
    )
    # transformers' RobertaEmbeddings registers its position table last.
    ROBERTA_ORDER = ModelOrder(
        before=(
            "embeddings/word_embeddings",
            "embeddings/token_type_embeddings",
            "embeddings/LayerNorm",
            "embeddings/position_embeddings",
        ),
        layers="encoder/layer/{}",
        sublayers=_LAYER,
        after=_HEADS,
    )

    @property
    def MODEL_ORDER(self) -> ModelOrder:  # noqa: N802 (the architecture contract's name)
        """The declared model order (:mod:`spry_jax.models.order`): BERT's or RoBERTa's."""
        return self.ROBERTA_ORDER if self.roberta else self.BERT_ORDER

    def __init__(
        self,
        config,
        *,
        task: str = "classification",
        num_labels: int = 2,
        dtype=jnp.float32,
        quant: str = "none",
        pooling: str = "default",
        rngs: nnx.Rngs,
    ):
        self._init_common(config, task, num_labels, pooling, dtype)
        self.roberta = config.model_type == "roberta"
        self.HF_PREFIXES = ("roberta.",) if self.roberta else ("bert.",)
        h = config.hidden_size
        if h % config.num_attention_heads:
            raise ValueError(
                f"hidden_size={h} is not a multiple of num_attention_heads="
                f"{config.num_attention_heads}."
            )
        self.num_heads = config.num_attention_heads
        self.hidden_dropout = float(config.hidden_dropout_prob)
        self.attn_dropout = float(config.attention_probs_dropout_prob)
        cls_drop = getattr(config, "classifier_dropout", None)
        self.classifier_dropout = float(self.hidden_dropout if cls_drop is None else cls_drop)
        self.pad_token_id = int(config.pad_token_id or 0)
        self.type_vocab_size = int(config.type_vocab_size)
        self.act = config.hidden_act
        eps = config.layer_norm_eps
        kw = dict(dtype=dtype, quant=quant, rngs=rngs)
        self.embeddings = _bert_embeddings(config, h, eps, dtype, rngs)
        layers = []
        for _ in range(config.num_hidden_layers):
            layers.append(
                node(
                    attention=node(
                        self=node(
                            query=Linear(h, h, **kw),
                            key=Linear(h, h, **kw),
                            value=Linear(h, h, **kw),
                        ),
                        output=node(
                            dense=Linear(h, h, **kw), LayerNorm=LayerNorm(h, eps=eps, dtype=dtype)
                        ),
                    ),
                    intermediate=node(dense=Linear(h, config.intermediate_size, **kw)),
                    output=node(
                        dense=Linear(config.intermediate_size, h, **kw),
                        LayerNorm=LayerNorm(h, eps=eps, dtype=dtype),
                    ),
                )
            )
        self.encoder = node(layer=nnx.List(layers))
        if task == "qa":
            self.qa_outputs = Linear(h, 2, rngs=rngs)
        elif pooling == "mean":
            self.classifier = Linear(h, self.num_labels, rngs=rngs)
        elif self.roberta:
            self.classifier = heads.RobertaClassificationHead(
                h, self.num_labels, dropout_rate=self.classifier_dropout, rngs=rngs
            )
        else:
            self.pooler = heads.Pooler(h, dtype=dtype, quant=quant, rngs=rngs)
            self.classifier = Linear(h, self.num_labels, rngs=rngs)

    def encode(
        self,
        input_ids: Array,
        attention_mask: Array,
        rng: Array | None,
        token_type_ids: Array | None = None,
    ) -> Array:
        """Last hidden states ``[batch, seq, hidden]`` in the model dtype."""
        emb = self.embeddings
        t = input_ids.shape[1]
        if self.roberta:
            not_pad = (input_ids != self.pad_token_id).astype(jnp.int32)
            positions = jnp.cumsum(not_pad, axis=1) * not_pad + self.pad_token_id
        else:
            positions = jnp.arange(t, dtype=jnp.int32)[None, :]
        types = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        x = emb.word_embeddings(input_ids) + emb.token_type_embeddings(types)
        x = (x + emb.position_embeddings(positions)).astype(self.dtype)
        x = dropout(emb.LayerNorm(x), self.hidden_dropout, fold_rng(rng, 0))
        mask = make_attention_mask(attention_mask)
        act = activation(self.act)
        for i, layer in enumerate(self.encoder.layer):
            body = functools.partial(self._layer, layer, mask, act, fold_rng(rng, i + 1))
            x = maybe_remat(body, self.layer_remat, self.layer_cut)(x)
        return x

    def _layer(self, layer, mask: Array, act, r: Array | None, x: Array) -> Array:
        att = layer.attention
        ctx = _self_attention(
            att.self.query,
            att.self.key,
            att.self.value,
            x,
            mask,
            self.num_heads,
            self.attn_dropout,
            fold_rng(r, 0),
        )
        a = att.output.dense(ctx, dropout_rng=fold_rng(r, 1))
        x = att.output.LayerNorm(dropout(a, self.hidden_dropout, fold_rng(r, 2)) + x)
        f = act(layer.intermediate.dense(x, dropout_rng=fold_rng(r, 3)))
        f = layer.output.dense(f, dropout_rng=fold_rng(r, 4))
        return layer.output.LayerNorm(dropout(f, self.hidden_dropout, fold_rng(r, 5)) + x)

    def _classify(self, hidden: Array, attention_mask: Array, rng: Array | None) -> Array:
        if self.roberta:
            return self.classifier(hidden.astype(jnp.float32), dropout_rng=rng)
        pooled = self.pooler(hidden, dropout_rng=fold_rng(rng, 0)).astype(jnp.float32)
        return self.classifier(dropout(pooled, self.classifier_dropout, fold_rng(rng, 1)))


def _bert_embeddings(config: Any, width: int, eps: float, dtype, rngs: nnx.Rngs) -> Node:
    """Word, position and token-type tables plus LayerNorm (BERT/RoBERTa/ALBERT embeddings)."""
    return node(
        word_embeddings=Embedding(config.vocab_size, width, dtype=dtype, rngs=rngs),
        position_embeddings=Embedding(
            config.max_position_embeddings, width, dtype=dtype, rngs=rngs
        ),
        token_type_embeddings=Embedding(config.type_vocab_size, width, dtype=dtype, rngs=rngs),
        LayerNorm=LayerNorm(width, eps=eps, dtype=dtype),
    )


def _sinusoidal_table(n_pos: int, dim: int) -> np.ndarray:
    """DistilBERT's fixed sinusoidal position table (used for random init only)."""
    j = np.arange(dim)
    angle = np.arange(n_pos)[:, None] / np.power(10000, 2 * (j // 2) / dim)[None, :]
    return np.where(j % 2 == 0, np.sin(angle), np.cos(angle)).astype(np.float32)


class DistilBertModel(EncoderBase):
    """DistilBERT: no token types; ``q_lin``/``k_lin``/``v_lin``/``out_lin``; ``ffn.lin1/lin2``.

    Its classification head (``pre_classifier`` + ReLU + ``classifier``) is new in a fine-tuning
    run, so both parts form the trainable head (PEFT's default would leave ``pre_classifier``
    frozen at its random init).
    """

    LORA_TARGETS = (r"(^|/)q_lin$", r"(^|/)v_lin$")
    IA3_TARGETS = (r"(^|/)k_lin$", r"(^|/)v_lin$")
    IA3_FEEDFORWARD = (r"(^|/)lin2$",)
    HF_PREFIXES = ("distilbert.",)
    HF_IGNORED_PREFIXES = ("vocab_transform.", "vocab_layer_norm.", "vocab_projector.")
    MODEL_ORDER = ModelOrder(
        before=(
            "embeddings/word_embeddings",
            "embeddings/position_embeddings",
            "embeddings/LayerNorm",
        ),
        layers="transformer/layer/{}",
        sublayers=(
            "attention/q_lin",
            "attention/k_lin",
            "attention/v_lin",
            "attention/out_lin",
            "sa_layer_norm",
            "ffn/lin1",
            "ffn/lin2",
            "output_layer_norm",
        ),
        after=("pre_classifier", "classifier", "qa_outputs"),
    )

    def __init__(
        self,
        config,
        *,
        task: str = "classification",
        num_labels: int = 2,
        dtype=jnp.float32,
        quant: str = "none",
        pooling: str = "default",
        rngs: nnx.Rngs,
    ):
        self._init_common(config, task, num_labels, pooling, dtype)
        d = config.dim
        if d % config.n_heads:
            raise ValueError(f"dim={d} is not a multiple of n_heads={config.n_heads}.")
        self.num_heads = config.n_heads
        self.hidden_dropout = float(config.dropout)
        self.attn_dropout = float(config.attention_dropout)
        self.classifier_dropout = float(
            config.qa_dropout if task == "qa" else config.seq_classif_dropout
        )
        if pooling == "mean":
            self.classifier_dropout = self.hidden_dropout
        self.act = config.activation
        kw = dict(dtype=dtype, quant=quant, rngs=rngs)
        pos = Embedding(config.max_position_embeddings, d, dtype=dtype, rngs=rngs)
        if config.sinusoidal_pos_embds:
            table = _sinusoidal_table(config.max_position_embeddings, d)
            pos.embedding[...] = jnp.asarray(table, pos.embedding[...].dtype)
        self.embeddings = node(
            word_embeddings=Embedding(config.vocab_size, d, dtype=dtype, rngs=rngs),
            position_embeddings=pos,
            LayerNorm=LayerNorm(d, eps=1e-12, dtype=dtype),
        )
        layers = []
        for _ in range(config.n_layers):
            layers.append(
                node(
                    attention=node(
                        q_lin=Linear(d, d, **kw),
                        k_lin=Linear(d, d, **kw),
                        v_lin=Linear(d, d, **kw),
                        out_lin=Linear(d, d, **kw),
                    ),
                    sa_layer_norm=LayerNorm(d, eps=1e-12, dtype=dtype),
                    ffn=node(
                        lin1=Linear(d, config.hidden_dim, **kw),
                        lin2=Linear(config.hidden_dim, d, **kw),
                    ),
                    output_layer_norm=LayerNorm(d, eps=1e-12, dtype=dtype),
                )
            )
        self.transformer = node(layer=nnx.List(layers))
        if task == "qa":
            self.qa_outputs = Linear(d, 2, rngs=rngs)
        elif pooling == "mean":
            self.classifier = Linear(d, self.num_labels, rngs=rngs)
        else:
            self.pre_classifier = Linear(d, d, rngs=rngs)
            self.classifier = Linear(d, self.num_labels, rngs=rngs)

    @property
    def head_prefixes(self) -> tuple[str, ...]:
        if self.task == "classification" and self.pooling == "default":
            return ("pre_classifier", "classifier")
        return super().head_prefixes

    def encode(
        self,
        input_ids: Array,
        attention_mask: Array,
        rng: Array | None,
        token_type_ids: Array | None = None,
    ) -> Array:
        if token_type_ids is not None:
            # transformers' DistilBERT takes no token_type_ids either: it has no segment table,
            # so ids given here would be silently meaningless.
            raise ValueError(
                "DistilBERT has no token type embeddings; call it without token_type_ids "
                "(a text pair is told apart by its [SEP] token only)."
            )
        emb = self.embeddings
        positions = jnp.arange(input_ids.shape[1], dtype=jnp.int32)[None, :]
        x = (emb.word_embeddings(input_ids) + emb.position_embeddings(positions)).astype(self.dtype)
        x = dropout(emb.LayerNorm(x), self.hidden_dropout, fold_rng(rng, 0))
        mask = make_attention_mask(attention_mask)
        act = activation(self.act)
        for i, layer in enumerate(self.transformer.layer):
            body = functools.partial(self._layer, layer, mask, act, fold_rng(rng, i + 1))
            x = maybe_remat(body, self.layer_remat, self.layer_cut)(x)
        return x

    def _layer(self, layer, mask: Array, act, r: Array | None, x: Array) -> Array:
        att = layer.attention
        ctx = _self_attention(
            att.q_lin,
            att.k_lin,
            att.v_lin,
            x,
            mask,
            self.num_heads,
            self.attn_dropout,
            fold_rng(r, 0),
        )
        x = layer.sa_layer_norm(att.out_lin(ctx, dropout_rng=fold_rng(r, 1)) + x)
        f = act(layer.ffn.lin1(x, dropout_rng=fold_rng(r, 3)))
        f = layer.ffn.lin2(f, dropout_rng=fold_rng(r, 4))
        return layer.output_layer_norm(dropout(f, self.hidden_dropout, fold_rng(r, 5)) + x)

    def _classify(self, hidden: Array, attention_mask: Array, rng: Array | None) -> Array:
        x = jax.nn.relu(self.pre_classifier(hidden[:, 0].astype(jnp.float32)))
        return self.classifier(dropout(x, self.classifier_dropout, rng))

    def _qa(self, hidden: Array, rng: Array | None) -> Array:
        return heads.qa_logits(self.qa_outputs, dropout(hidden, self.classifier_dropout, rng))


class AlbertModel(EncoderBase):
    """ALBERT: factorised embeddings (``embedding_size`` -> ``hidden_size``) and layer weights
    shared across depth: ``num_hidden_layers`` applications of ``num_hidden_groups`` groups of
    ``inner_group_num`` layers. PEFT adapts each shared module once (as PEFT does), so LoRA on
    ALBERT-large has only query and value of one layer plus the head."""

    HF_PREFIXES = ("albert.",)
    IA3_FEEDFORWARD = (r"(^|/)ffn_output$",)
    # transformers' AlbertLayer registers full_layer_layer_norm before its attention.
    MODEL_ORDER = ModelOrder(
        before=(
            "embeddings/word_embeddings",
            "embeddings/position_embeddings",
            "embeddings/token_type_embeddings",
            "embeddings/LayerNorm",
            "encoder/embedding_hidden_mapping_in",
        ),
        layers="encoder/albert_layer_groups/{}/albert_layers/{}",
        sublayers=(
            "full_layer_layer_norm",
            "attention/query",
            "attention/key",
            "attention/value",
            "attention/dense",
            "attention/LayerNorm",
            "ffn",
            "ffn_output",
        ),
        after=("pooler", "classifier", "qa_outputs"),
    )

    def __init__(
        self,
        config,
        *,
        task: str = "classification",
        num_labels: int = 2,
        dtype=jnp.float32,
        quant: str = "none",
        pooling: str = "default",
        rngs: nnx.Rngs,
    ):
        self._init_common(config, task, num_labels, pooling, dtype)
        h, e = config.hidden_size, config.embedding_size
        if h % config.num_attention_heads:
            raise ValueError(
                f"hidden_size={h} is not a multiple of num_attention_heads="
                f"{config.num_attention_heads}."
            )
        if config.num_hidden_layers % config.num_hidden_groups:
            raise ValueError(
                f"num_hidden_layers={config.num_hidden_layers} must be a multiple of "
                f"num_hidden_groups={config.num_hidden_groups}."
            )
        self.num_heads = config.num_attention_heads
        self.num_layers = int(config.num_hidden_layers)
        self.num_groups = int(config.num_hidden_groups)
        self.hidden_dropout = float(config.hidden_dropout_prob)
        self.attn_dropout = float(config.attention_probs_dropout_prob)
        self.classifier_dropout = float(config.classifier_dropout_prob)
        if pooling == "mean":
            self.classifier_dropout = self.hidden_dropout
        self.type_vocab_size = int(config.type_vocab_size)
        self.act = config.hidden_act
        eps = config.layer_norm_eps
        kw = dict(dtype=dtype, quant=quant, rngs=rngs)
        self.embeddings = _bert_embeddings(config, e, eps, dtype, rngs)
        groups = []
        for _ in range(self.num_groups):
            inner = []
            for _ in range(config.inner_group_num):
                inner.append(
                    node(
                        attention=node(
                            query=Linear(h, h, **kw),
                            key=Linear(h, h, **kw),
                            value=Linear(h, h, **kw),
                            dense=Linear(h, h, **kw),
                            LayerNorm=LayerNorm(h, eps=eps, dtype=dtype),
                        ),
                        ffn=Linear(h, config.intermediate_size, **kw),
                        ffn_output=Linear(config.intermediate_size, h, **kw),
                        full_layer_layer_norm=LayerNorm(h, eps=eps, dtype=dtype),
                    )
                )
            groups.append(node(albert_layers=nnx.List(inner)))
        self.encoder = node(
            embedding_hidden_mapping_in=Linear(e, h, **kw), albert_layer_groups=nnx.List(groups)
        )
        if task == "qa":
            self.qa_outputs = Linear(h, 2, rngs=rngs)
        elif pooling == "mean":
            self.classifier = Linear(h, self.num_labels, rngs=rngs)
        else:
            self.pooler = Linear(h, h, **kw)
            self.classifier = Linear(h, self.num_labels, rngs=rngs)

    def encode(
        self,
        input_ids: Array,
        attention_mask: Array,
        rng: Array | None,
        token_type_ids: Array | None = None,
    ) -> Array:
        emb = self.embeddings
        positions = jnp.arange(input_ids.shape[1], dtype=jnp.int32)[None, :]
        types = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        x = emb.word_embeddings(input_ids) + emb.token_type_embeddings(types)
        x = (x + emb.position_embeddings(positions)).astype(self.dtype)
        x = dropout(emb.LayerNorm(x), self.hidden_dropout, fold_rng(rng, 0))
        x = self.encoder.embedding_hidden_mapping_in(x, dropout_rng=fold_rng(rng, 1))
        mask = make_attention_mask(attention_mask)
        act = activation(self.act)
        per_group = self.num_layers // self.num_groups
        step = 0
        for i in range(self.num_layers):
            group = self.encoder.albert_layer_groups[i // per_group]
            for layer in group.albert_layers:
                step += 1
                body = functools.partial(self._layer, layer, mask, act, fold_rng(rng, step + 1))
                x = maybe_remat(body, self.layer_remat, self.layer_cut)(x)
        return x

    def _layer(self, layer, mask: Array, act, r: Array | None, x: Array) -> Array:
        att = layer.attention
        ctx = _self_attention(
            att.query,
            att.key,
            att.value,
            x,
            mask,
            self.num_heads,
            self.attn_dropout,
            fold_rng(r, 0),
        )
        a = att.dense(ctx, dropout_rng=fold_rng(r, 1))
        x = att.LayerNorm(x + dropout(a, self.hidden_dropout, fold_rng(r, 2)))
        f = act(layer.ffn(x, dropout_rng=fold_rng(r, 3)))
        f = layer.ffn_output(f, dropout_rng=fold_rng(r, 4))
        return layer.full_layer_layer_norm(f + x)

    def _classify(self, hidden: Array, attention_mask: Array, rng: Array | None) -> Array:
        pooled = jnp.tanh(self.pooler(hidden[:, 0], dropout_rng=fold_rng(rng, 0)))
        pooled = pooled.astype(jnp.float32)
        return self.classifier(dropout(pooled, self.classifier_dropout, fold_rng(rng, 1)))
