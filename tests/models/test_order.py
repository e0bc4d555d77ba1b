"""The declared model order against the release's: PyTorch ``named_parameters()`` with PEFT.

Spry's units are consecutive chunks of the trainable tensors in model order, and the PyTorch
release takes that order from ``[n for n, p in net.named_parameters() if p.requires_grad]``
after ``peft.get_peft_model`` (LoRA, IA3) or after switching on every bias (BitFit). Here each
family's tiny random model is built with transformers' own PyTorch class, adapted the way PEFT
injects adapters (the tuner layer replaces the target module in its parent, so it keeps its
place; it holds the original as ``base_layer`` and registers its adapter weights after it),
and its trainable ``named_parameters()`` are mapped to our state paths through the family's
checkpoint mapping (``hf_key_to_path``). Our order (:func:`spry_jax.models.peft.trainable_paths`)
must equal it exactly. The task head is trainable in every method here and comes last in both
(the release leaves the head frozen under BitFit, a known fault we do not copy).
"""

from __future__ import annotations

import re

import pytest
import torch
import transformers
from flax import nnx

from spry_jax import models
from spry_jax.models import peft
from spry_jax.models.order import ModelOrder

VOCAB = 50

_ENC = dict(vocab_size=VOCAB, hidden_size=16, num_attention_heads=2, intermediate_size=24)
CONFIGS = {
    "bert": lambda: transformers.BertConfig(
        **_ENC, num_hidden_layers=11, max_position_embeddings=32
    ),
    "roberta": lambda: transformers.RobertaConfig(
        **_ENC, num_hidden_layers=2, max_position_embeddings=34, type_vocab_size=1, pad_token_id=1
    ),
    "distilbert": lambda: transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, hidden_dim=24, max_position_embeddings=32
    ),
    "albert": lambda: transformers.AlbertConfig(
        **_ENC, embedding_size=8, num_hidden_layers=3, max_position_embeddings=32
    ),
    "albert_groups": lambda: transformers.AlbertConfig(
        **_ENC,
        embedding_size=8,
        num_hidden_layers=4,
        num_hidden_groups=2,
        inner_group_num=2,
        max_position_embeddings=32,
    ),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        word_embed_proj_dim=16,
        ffn_dim=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        pad_token_id=1,
    ),
    # OPT-350m shape: post-LayerNorm, no final norm, embeddings projected in and out.
    "opt_350m": lambda: transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        word_embed_proj_dim=8,
        ffn_dim=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        do_layer_norm_before=False,
        pad_token_id=1,
    ),
    # Biases on, so that BitFit has body tensors to order; an untied LM head.
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=False,
        pad_token_id=1,
    ),
}
DECODERS = ("opt", "opt_350m", "llama")

# The adapters our families default to, written as PEFT target patterns (regexes that must
# match a torch module name in full, as PEFT applies a string target_modules).
TARGETS = {
    "bert": {"lora": r".*\.(query|value)", "ia3": r".*\.(key|value)|.*\.layer\.\d+\.output\.dense"},
    "distilbert": {"lora": r".*\.(q_lin|v_lin)", "ia3": r".*\.(k_lin|v_lin|lin2)"},
    "albert": {"lora": r".*\.(query|value)", "ia3": r".*\.(key|value|ffn_output)"},
    "opt": {"lora": r".*self_attn\.(q_proj|v_proj)", "ia3": r".*(self_attn\.(q_proj|k_proj)|fc2)"},
    "llama": {
        "lora": r".*self_attn\.(q_proj|v_proj)",
        "ia3": r".*(self_attn\.(k_proj|v_proj)|mlp\.down_proj)",
    },
}
TORCH_CLASSES = {
    "classification": transformers.AutoModelForSequenceClassification,
    "qa": transformers.AutoModelForQuestionAnswering,
    "causal_lm": transformers.AutoModelForCausalLM,
}


def _targets(family: str) -> dict[str, str]:
    return TARGETS[family.split("_")[0].replace("roberta", "bert")]


class _TunerLayer(torch.nn.Module):
    """What PEFT puts in a target module's place: the original as ``base_layer``, then the
    adapter weights (``lora_A``/``lora_B`` ModuleDicts, or the ``ia3_l`` ParameterDict)."""

    def __init__(self, base: torch.nn.Linear, method: str):
        super().__init__()
        self.base_layer = base
        if method == "lora":
            self.lora_A = torch.nn.ModuleDict(
                {"default": torch.nn.Linear(base.in_features, 1, bias=False)}
            )
            self.lora_B = torch.nn.ModuleDict(
                {"default": torch.nn.Linear(1, base.out_features, bias=False)}
            )
        else:
            self.ia3_l = torch.nn.ParameterDict(
                {"default": torch.nn.Parameter(torch.ones(base.out_features))}
            )


def _inject(tm: torch.nn.Module, pattern: str, method: str) -> int:
    """Replaces every Linear whose name matches ``pattern`` in full, in its parent (PEFT's
    ``_replace_module``: ``setattr`` keeps the child's place in the parent's ordered dict)."""
    names = [n for n, m in tm.named_modules() if isinstance(m, torch.nn.Linear)]
    chosen = [n for n in names if re.fullmatch(pattern, n)]
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = tm.get_submodule(parent_name)
        setattr(parent, child, _TunerLayer(getattr(parent, child), method))
    return len(chosen)


def release_order(tm: torch.nn.Module, ours, family: str, method: str) -> list[str]:
    """Our state paths of the release's trainable tensors, in ``named_parameters()`` order."""
    if method in ("lora", "ia3"):
        assert _inject(tm, _targets(family)[method], method) > 0
    head = tuple(ours.head_prefixes)
    known = {path for path, _ in peft.iter_variables(ours)}
    paths = []
    for name, _ in tm.named_parameters():
        base = name.replace(".base_layer.", ".")
        leaf = None
        for adapter, ours_leaf in (
            (".lora_A.default.weight", "lora_a"),
            (".lora_B.default.weight", "lora_b"),
            (".ia3_l.default", "ia3"),
        ):
            if base.endswith(adapter):
                base, leaf = base[: -len(adapter)] + ".weight", ours_leaf
        if base.startswith("transformer."):  # LlamaForQuestionAnswering's backbone attribute
            base = "model." + base[len("transformer.") :]
        path = _resolve(ours, known, base)
        assert path in known, (name, path)
        if leaf is not None:
            path = path.rsplit("/", 1)[0] + "/" + leaf
        in_head = any(path == p or path.startswith(p + "/") for p in head)
        if in_head or leaf is not None or (method == "bitfit" and name.endswith(".bias")):
            paths.append(path)
    return paths


def _cases():
    for family in CONFIGS:
        tasks = (
            ("classification", "qa", "causal_lm")
            if family in DECODERS
            else ("classification", "qa")
        )
        for task in tasks:
            for method in ("lora", "ia3", "bitfit"):
                yield family, task, method


@pytest.mark.parametrize("family,task,method", list(_cases()))
def test_trainable_order_is_the_release_order(family, task, method):
    config = CONFIGS[family]()
    config.num_labels = 2 if task == "qa" else 3
    torch.manual_seed(0)
    tm = TORCH_CLASSES[task].from_config(config)
    ours = models.build_model(config, task=task, num_labels=3)
    cfg = {"method": method}
    models.apply_peft(ours, cfg)
    want = release_order(tm, ours, family, method)
    got = list(peft.trainable_paths(ours, cfg))
    assert set(got) == set(want), (sorted(set(got) - set(want)), sorted(set(want) - set(got)))
    assert got == want


def _resolve(ours, known: set[str], key: str) -> str:
    path = ours.hf_key_to_path(key)
    assert path is not None, key
    if path.endswith("/weight"):  # torch's one name for a kernel, a table or a norm scale
        parent = path.rsplit("/", 1)[0]
        path = next(
            f"{parent}/{c}" for c in ("kernel", "embedding", "scale") if f"{parent}/{c}" in known
        )
    return path


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_every_weight_in_the_release_order(family):
    """Not only the trainable tensors: every weight, frozen ones included, sits where the
    PyTorch model lists it (so a BitFit, IA3 or new PEFT method cannot find a stale place)."""
    config = CONFIGS[family]()
    config.num_labels = 3
    task = "causal_lm" if family in DECODERS else "classification"
    tm = TORCH_CLASSES[task].from_config(config)
    ours = models.build_model(config, task=task, num_labels=3)
    got = [path for path, _ in peft.iter_variables(ours)]
    want = [_resolve(ours, set(got), name) for name, _ in tm.named_parameters()]
    assert got == want


@pytest.mark.parametrize("pooling", ["default", "mean"])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_every_variant_is_declared_and_merge_keeps_the_order(family, pooling):
    """Every module of every head/pooling/quantisation variant is placed by MODEL_ORDER, and
    ``nnx.split``/``merge`` (which rebuilds modules with attributes in alphabetical order)
    leaves the order unchanged: it comes from the declaration, not from attribute order."""
    config = CONFIGS[family]()
    tasks = (
        ("classification", "qa", "causal_lm") if family in DECODERS else ("classification", "qa")
    )
    for task in tasks:
        ours = models.build_model(config, task=task, num_labels=3, pooling=pooling, quant="int8")
        models.apply_peft(ours, {"method": "lora"})
        order = peft.trainable_paths(ours, {"method": "lora"})
        graphdef, state = nnx.split(ours)
        merged = nnx.merge(graphdef, state)
        assert peft.trainable_paths(merged, {"method": "lora"}) == order
        assert [p for p, _ in peft.iter_variables(merged)] == [
            p for p, _ in peft.iter_variables(ours)
        ]


def test_undeclared_module_is_refused_by_name():
    order = ModelOrder(before=("embed",), layers="layers/{}", sublayers=("q",), after=("head",))
    assert order.module_key("layers/10/q") > order.module_key("layers/9/q")  # numeric
    assert order.module_key("embed") < order.module_key("layers/0/q") < order.module_key("head")
    with pytest.raises(ValueError, match="'layers/0/k' holds weights"):
        order.module_key("layers/0/k")
    with pytest.raises(ValueError, match="'pooler' holds weights"):
        order.module_key("pooler")
