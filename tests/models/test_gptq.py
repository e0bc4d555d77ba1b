"""GPTQ checkpoints as the frozen int4 base (spry_jax.models.gptq).

Each test writes a tiny Llama or OPT checkpoint itself, in the GPTQ packed layout as its public
specification describes it (AutoGPTQ / GPTQModel / transformers; the layout is written out in
``spry_jax/models/gptq.py``):

* ``qweight int32 [in/8, out]``: code of input row ``8i+j`` in bits ``4j..4j+3`` of word ``i``;
* ``qzeros int32 [groups, out/8]``: zero point of output column ``8k+j`` in bits ``4j..4j+3``
  of word ``k``, stored minus one in format "gptq" (v1), as is in "gptq_v2";
* ``scales float16 [groups, out]``; ``g_idx int32 [in]``: the group of every input row (a
  permuted grouping with act-order); ``W = scales[g] * (q - zero[g])``.

The float weights are quantised by the test's own GPTQ-style grouping (act-order = groups
formed over a random permutation of the inputs), packed by the test's own loops, and the
reference logits come from an independent path: the test unpacks the tensors with numpy
(indexing words by ``i // 8`` and shifting by ``4 * (i % 8)``, not the package's code),
dequantises, and runs transformers' PyTorch float model with those weights. A checkpoint
packed in the wrong nibble order, or with the zero-point convention mixed up, must (and does)
fail the same comparison.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from spry_jax import models
from spry_jax.models import gptq, peft, quant
from spry_jax.models.layers import Linear

VOCAB = 97
PAD = 1

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=PAD,
    ),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        word_embed_proj_dim=64,
        ffn_dim=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=40,
        pad_token_id=PAD,
        dropout=0.0,
        attention_dropout=0.0,
    ),
}
QUANTISED = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}


def _quantise(w: np.ndarray, group: int, act_order: bool, sym: bool, rng) -> dict:
    """GPTQ-style grouping and rounding of a torch ``[out, in]`` weight.

    Returns integer codes ``q [in, out]``, zero points ``z [groups, out]``, float16 scales
    ``[groups, out]`` and ``g_idx [in]``. With act-order the groups are consecutive runs of a
    random permutation of the inputs (as GPTQ's desc_act orders them by the Hessian).
    """
    n_out, n_in = w.shape
    g = n_in if group == -1 else group
    n_groups = -(-n_in // g)
    order = rng.permutation(n_in) if act_order else np.arange(n_in)
    g_idx = np.empty(n_in, np.int32)
    g_idx[order] = np.arange(n_in) // g
    q = np.empty((n_in, n_out), np.int64)
    z = np.empty((n_groups, n_out), np.int64)
    s = np.empty((n_groups, n_out), np.float16)
    for k in range(n_groups):
        rows = np.flatnonzero(g_idx == k)
        block = w[:, rows].T  # [rows, out]
        if sym:
            scale = (2 * np.abs(block).max(0) / 15).astype(np.float16)
            zero = np.full(n_out, 8)
        else:
            lo, hi = np.minimum(block.min(0), 0), np.maximum(block.max(0), 0)
            scale = ((hi - lo) / 15).astype(np.float16)
            # 1..15 so that "zero - 1" of format v1 fits a nibble (v1 cannot store 0).
            zero = np.clip(np.round(-lo / scale.astype(np.float32)), 1, 15).astype(np.int64)
        s[k], z[k] = scale, zero
        q[rows] = np.clip(np.round(block / scale.astype(np.float32)) + zero, 0, 15)
    return dict(q=q, z=z, s=s, g_idx=g_idx)


def _pack_rows(q: np.ndarray, reverse: bool = False) -> np.ndarray:
    """``[in, out]`` codes -> int32 ``[in/8, out]``; ``reverse`` = a wrong (high-first) order."""
    words = np.zeros((q.shape[0] // 8, q.shape[1]), np.int64)
    for j in range(8):
        shift = 4 * (7 - j if reverse else j)
        words |= q[j::8].astype(np.int64) << shift
    return words.astype(np.uint32).view(np.int32)


def _pack_cols(z: np.ndarray) -> np.ndarray:
    """``[groups, out]`` -> int32 ``[groups, out/8]``."""
    words = np.zeros((z.shape[0], z.shape[1] // 8), np.int64)
    for j in range(8):
        words |= z[:, j::8].astype(np.int64) << (4 * j)
    return words.astype(np.uint32).view(np.int32)


def _nibble(words: np.ndarray, index: np.ndarray) -> np.ndarray:
    return (words.astype(np.uint32).astype(np.int64) >> (4 * (index % 8))) & 0xF


def _dequantise(t: dict[str, np.ndarray], fmt: str) -> np.ndarray:
    """The reference: torch ``[out, in]`` float32 weight from the packed tensors, by indexing
    (row ``i`` is nibble ``i % 8`` of word ``i // 8``)."""
    n_in = t["qweight"].shape[0] * 8
    n_out = t["scales"].shape[1]
    rows = np.arange(n_in)
    q = _nibble(t["qweight"][rows // 8, :], rows[:, None])  # [in, out]
    cols = np.arange(n_out)
    z = _nibble(t["qzeros"][:, cols // 8], cols[None, :]) + (1 if fmt == "gptq" else 0)
    g = t["g_idx"]
    w = t["scales"].astype(np.float32)[g] * (q - z[g]).astype(np.float32)
    return w.T.astype(np.float32)


def _write(
    family: str,
    path: pathlib.Path,
    *,
    group: int,
    act_order: bool,
    sym: bool,
    fmt: str = "gptq",
    config_in: str = "config.json",
    declared_fmt: str | None = None,
    reverse_nibbles: bool = False,
    seed: int = 0,
):
    """Writes a GPTQ checkpoint of a random tiny model; returns (reference torch model, the
    checkpoint's tensors)."""
    config = CONFIGS[family]()
    torch.manual_seed(seed)
    tm = transformers.AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tm.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.2
            p.copy_(1.0 + noise if "norm" in name else noise)
    rng = np.random.default_rng(seed)
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    tensors: dict[str, np.ndarray] = {}
    for key, value in sd.items():
        module, _, leaf = key.rpartition(".")
        if leaf == "weight" and module.rsplit(".", 1)[-1] in QUANTISED[family]:
            qz = _quantise(value, group, act_order, sym, rng)
            stored_zero = qz["z"] - 1 if fmt == "gptq" else qz["z"]
            tensors[f"{module}.qweight"] = _pack_rows(qz["q"], reverse=reverse_nibbles)
            tensors[f"{module}.qzeros"] = _pack_cols(stored_zero)
            tensors[f"{module}.scales"] = qz["s"]
            tensors[f"{module}.g_idx"] = qz["g_idx"]
        elif key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        else:
            tensors[key] = value.astype(np.float16)
    safetensors.numpy.save_file(tensors, str(path / "model.safetensors"), {"format": "pt"})
    qcfg = dict(
        quant_method="gptq",
        bits=4,
        group_size=group,
        desc_act=act_order,
        sym=sym,
        damp_percent=0.01,
        true_sequential=True,
        checkpoint_format=declared_fmt or fmt,
    )
    cfg = config.to_dict()
    if config_in == "config.json":
        cfg["quantization_config"] = qcfg
    else:
        (path / "quantize_config.json").write_text(json.dumps(qcfg))
    (path / "config.json").write_text(json.dumps(cfg))

    # The reference: transformers' float model with the independently dequantised weights.
    ref = transformers.AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()
    new_sd = {}
    for key in ref.state_dict():
        module = key.rpartition(".")[0]
        if f"{module}.qweight" in tensors and key.endswith(".weight"):
            parts = {p: tensors[f"{module}.{p}"] for p in gptq.PARTS}
            new_sd[key] = torch.from_numpy(_dequantise(parts, fmt))
        elif key in tensors:
            new_sd[key] = torch.from_numpy(tensors[key].astype(np.float32))
        else:  # a tied lm_head
            new_sd[key] = torch.from_numpy(tensors["model.decoder.embed_tokens.weight"]).float()
    ref.load_state_dict(new_sd, strict=True)
    return ref, tensors


def _batch(seed: int = 0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, VOCAB, size=(3, 9))
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, :3] = 0
    ids[mask == 0] = PAD
    return ids, mask


def _torch_logits(tm, ids, mask):
    with torch.no_grad():
        return tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def _err(got, want, mask) -> float:
    keep = mask.astype(bool)
    return float(np.abs(got[keep] - want[keep]).max() / np.abs(want[keep]).max())


CASES = [
    # family, group_size, act_order, sym, checkpoint_format, where the config lives
    ("llama", 32, False, True, "gptq", "config.json"),
    ("llama", 32, True, False, "gptq", "quantize_config.json"),
    ("llama", 48, True, False, "gptq_v2", "config.json"),  # last group shorter (64 = 48 + 16)
    ("llama", -1, False, False, "gptq", "config.json"),
    ("opt", 32, True, True, "gptq_v2", "config.json"),
    ("opt", 32, False, False, "gptq", "quantize_config.json"),
    ("opt", -1, True, True, "gptq", "config.json"),
]


@pytest.mark.parametrize("family,group,act_order,sym,fmt,config_in", CASES)
def test_gptq_logits_match_the_dequantised_float_model(
    family, group, act_order, sym, fmt, config_in, tmp_path
):
    ref, tensors = _write(
        family, tmp_path, group=group, act_order=act_order, sym=sym, fmt=fmt, config_in=config_in
    )
    model = models.from_pretrained(tmp_path, task="causal_lm")
    ids, mask = _batch()
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    want = _torch_logits(ref, ids, mask)
    assert _err(got, want, mask) < 2e-5

    # Stored as int4 codes with the checkpoint's float16 scales; zero points only when
    # asymmetric, a permutation only for act-order with groups; never a float kernel.
    lins = [
        (p, m) for p, m in peft.iter_modules(model) if isinstance(m, Linear) and "head" not in p
    ]
    assert len(lins) == 2 * len(QUANTISED[family])
    for path, lin in lins:
        assert lin.quant == "int4" and lin.kernel[...].dtype == jnp.uint8
        assert lin.kernel_scale[...].dtype == jnp.float16
        assert (lin.kernel_zero is None) == sym
        assert (lin.input_perm is None) == (not act_order or group == -1)
        want_bytes = quant.quantized_nbytes(
            lin.in_features,
            lin.out_features,
            "int4",
            group_size=lin.in_features if group == -1 else group,
            scale_bytes=2,
            zero_points=not sym,
            act_order=lin.input_perm is not None,
        )
        stored = sum(
            getattr(lin, a)[...].nbytes
            for a in ("kernel", "kernel_scale", "kernel_zero", "input_perm")
            if getattr(lin, a) is not None
        )
        assert stored == want_bytes, path
        # weight() is the kernel in the natural input order: the reference's weight.
        module = path.replace("model/", "model.", 1).replace("/", ".")
        np.testing.assert_allclose(
            np.asarray(lin.weight(jnp.float32)).T,
            ref.state_dict()[f"{module}.weight"].numpy(),
            rtol=0,
            atol=0,
        )


def test_writer_and_reference_agree_with_the_quantiser():
    """The test's packer and its unpacking reference invert each other on both formats."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(24, 64)).astype(np.float32)
    for fmt in ("gptq", "gptq_v2"):
        qz = _quantise(w, 16, True, False, rng)
        tensors = dict(
            qweight=_pack_rows(qz["q"]),
            qzeros=_pack_cols(qz["z"] - (1 if fmt == "gptq" else 0)),
            scales=qz["s"],
            g_idx=qz["g_idx"],
        )
        g = qz["g_idx"]
        direct = (qz["s"].astype(np.float32)[g] * (qz["q"] - qz["z"][g])).T
        np.testing.assert_array_equal(_dequantise(tensors, fmt), direct.astype(np.float32))
        assert np.abs(direct - w).max() <= 0.5 * qz["s"].astype(np.float32).max() + 1e-3


@pytest.mark.parametrize(
    "wrong", ["reversed_nibbles", "v2_zeros_declared_v1", "v1_zeros_declared_v2"]
)
def test_a_wrong_packing_fails_the_comparison(wrong, tmp_path):
    """The comparison above catches a checkpoint packed in another order or zero convention:
    loading one gives logits far from the correctly dequantised reference."""
    kwargs = dict(group=32, act_order=True, sym=False)
    if wrong == "reversed_nibbles":
        bad = tmp_path / "bad"
        bad.mkdir()
        ref, _ = _write("llama", tmp_path, **kwargs)
        _write("llama", bad, reverse_nibbles=True, **kwargs)
    elif wrong == "v2_zeros_declared_v1":
        bad = tmp_path
        ref, _ = _write("llama", tmp_path, fmt="gptq_v2", declared_fmt="gptq", **kwargs)
    else:
        bad = tmp_path
        ref, _ = _write("llama", tmp_path, fmt="gptq", declared_fmt="gptq_v2", **kwargs)
    ids, mask = _batch()
    got = np.asarray(models.from_pretrained(bad, task="causal_lm")(ids, mask))
    assert _err(got, _torch_logits(ref, ids, mask), mask) > 1e-2


def test_symmetric_checkpoint_with_the_other_zero_convention_is_refused(tmp_path):
    _write("opt", tmp_path, group=32, act_order=False, sym=True, fmt="gptq_v2", declared_fmt="gptq")
    with pytest.raises(ValueError, match="checkpoint_format='gptq_v2'"):
        models.from_pretrained(tmp_path, task="causal_lm")


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("bits", 8, "bits=8"),
        ("checkpoint_format", "marlin", "checkpoint_format='marlin'"),
        ("quant_method", "awq", "quant_method='awq'"),
        ("pack_dtype", "int16", "pack_dtype='int16'"),
        ("lm_head", True, "lm_head=True"),
        ("group_size", 0, "group_size=0"),
    ],
)
def test_unsupported_quantisation_is_refused_by_name(field, value, match, tmp_path):
    _write("llama", tmp_path, group=32, act_order=False, sym=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"][field] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        models.from_pretrained(tmp_path, task="causal_lm")


def test_quant_argument_and_conflicting_configs(tmp_path):
    _write("llama", tmp_path, group=32, act_order=False, sym=True)
    with pytest.raises(ValueError, match="quant='int8' cannot be applied"):
        models.from_pretrained(tmp_path, task="causal_lm", quant="int8")
    models.from_pretrained(tmp_path, task="causal_lm", quant="int4")
    (tmp_path / "quantize_config.json").write_text(
        json.dumps(dict(bits=4, group_size=64, sym=True, desc_act=False))
    )
    with pytest.raises(ValueError, match="disagrees.*group_size"):
        models.from_pretrained(tmp_path, task="causal_lm")


def test_gptq_base_lora_jvp_equals_grad_and_lazy_backward_is_exact(tmp_path):
    """Forward mode (Spry) goes through the int4 base with zero points and act-order, and the
    backprop rows' lazily dequantising backward pass gives the plain gradient."""
    _write("opt", tmp_path, group=32, act_order=True, sym=False)
    cfg = dict(method="lora", lora_rank=2, lora_alpha=4.0, lora_dropout=0.0)
    model = models.from_pretrained(tmp_path, task="classification", num_labels=3, peft=cfg)
    sm = models.split_model(model, cfg)
    # The same weights built with the backprop rows' lazy dequantisation (a second split: the
    # first one's graph keeps the plain build).
    lazy = models.split_model(models.set_build_options(model, lazy_dequant=True), cfg)
    ids, mask = (jnp.asarray(a) for a in _batch())
    rng = np.random.default_rng(0)
    w = {k: jnp.asarray(rng.normal(size=v.shape) * 0.3, v.dtype) for k, v in sm.trainable.items()}
    v = {k: jnp.asarray(rng.normal(size=x.shape), x.dtype) for k, x in w.items()}

    def loss_of(split):
        return lambda t: jnp.sum(jnp.sin(split.apply_fn(t, split.frozen, ids, mask)))

    loss = loss_of(sm)
    tangent = jax.jit(lambda w, v: jax.jvp(loss, (w,), (v,))[1])(w, v)
    grads = {name: jax.jit(jax.grad(loss_of(s)))(w) for name, s in (("plain", sm), ("lazy", lazy))}
    # Only the lazy build traces the base matmuls as the custom_vjp quantized_matmul.
    assert "custom_vjp" in str(jax.make_jaxpr(jax.grad(loss_of(lazy)))(w))
    assert "custom_vjp" not in str(jax.make_jaxpr(jax.grad(loss))(w))
    for k in w:
        np.testing.assert_array_equal(grads["lazy"][k], grads["plain"][k])
    dot = sum(jnp.vdot(grads["plain"][k], v[k]) for k in w)
    np.testing.assert_allclose(float(tangent), float(dot), rtol=1e-4, atol=1e-4)
    # The frozen half holds the int4 codes, float16 scales, zero points and permutations.
    kinds = {str(p[-1]) for p, _ in nnx.to_flat_state(sm.frozen)}
    assert {"kernel", "kernel_scale", "kernel_zero", "input_perm"} <= kinds
