"""OPT and Llama decoders against transformers' PyTorch implementations.

Every parity test builds a tiny random model with transformers' PyTorch class, saves it with
``save_pretrained`` (safetensors), loads it with ``spry_jax.models.from_pretrained`` and
compares logits on a padded batch (right-padded rows and one left-padded row).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from spry_jax import models
from spry_jax.models import decoders, peft, quant, registry
from spry_jax.models.layers import Linear

VOCAB = 101
PAD = 1

CONFIGS = {
    # OPT-125m shape: pre-LayerNorm, word_embed_proj_dim == hidden_size.
    "opt": lambda: transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        word_embed_proj_dim=32,
        ffn_dim=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=40,
        pad_token_id=PAD,
        dropout=0.0,
        attention_dropout=0.0,
    ),
    # OPT-350m shape: post-LayerNorm, no final norm, embeddings projected in and out.
    "opt_350m": lambda: transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        word_embed_proj_dim=16,
        ffn_dim=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=40,
        do_layer_norm_before=False,
        pad_token_id=PAD,
        dropout=0.0,
        attention_dropout=0.0,
    ),
    # Llama 2 shape with grouped-query attention and an untied LM head.
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=56,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        pad_token_id=PAD,
    ),
    # SmolLM2/Llama 3 shape: tied embeddings, one KV head, llama3 RoPE scaling, biases on.
    "llama_tied": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=56,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        },
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
        pad_token_id=PAD,
    ),
}
TORCH_CLASSES = {
    "classification": transformers.AutoModelForSequenceClassification,
    "qa": transformers.AutoModelForQuestionAnswering,
    "causal_lm": transformers.AutoModelForCausalLM,
}
CASES = [
    (family, task)
    for family in CONFIGS
    for task in ("classification", "qa", "causal_lm")
    if not (family == "llama_tied" and task != "causal_lm")
]


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Re-draws every parameter at O(0.1-1) scale so that a wrong op changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            p.copy_(1.0 + noise if "norm" in name else noise)


def _batch(seed: int = 0):
    """Rows: full length, right-padded to 6, right-padded to 3, left-padded (4 pads)."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, VOCAB, size=(4, 10))
    mask = np.ones_like(ids)
    for row, length in ((1, 6), (2, 3)):
        mask[row, length:] = 0
    mask[3, :4] = 0
    ids[mask == 0] = PAD
    return ids, mask


def _torch_logits(tm, ids, mask, task):
    with torch.no_grad():
        out = tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if task == "qa":
        return np.stack([out.start_logits.numpy(), out.end_logits.numpy()], axis=-1)
    return out.logits.numpy()


def _save_torch(family, task, path, num_labels=3, seed=0):
    config = CONFIGS[family]()
    config.num_labels = 2 if task == "qa" else num_labels
    torch.manual_seed(seed)
    tm = TORCH_CLASSES[task].from_config(config).eval()
    _randomize(tm, seed)
    tm.save_pretrained(path)
    return tm, config


@pytest.mark.parametrize("family,task", CASES)
def test_parity_float32(family, task, tmp_path):
    tm, _ = _save_torch(family, task, tmp_path)
    model = models.from_pretrained(tmp_path, task=task, num_labels=3)
    ids, mask = _batch()
    ref = _torch_logits(tm, ids, mask, task)
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.abs(ref).max() > 0.5  # the comparison is not between near-zero numbers
    if task == "classification":
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    else:
        # Token-level logits at real tokens; the queries of left padding attend to nothing
        # and are undefined (neither side uses them).
        real = mask.astype(bool)
        np.testing.assert_allclose(got[real], ref[real], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(got[:3][real[:3]], ref[:3][real[:3]], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["opt", "llama_tied"])
def test_bare_backbone_checkpoint(family, tmp_path):
    """A checkpoint saved from the bare backbone (facebook/opt-* on the hub are saved this way:
    keys ``decoder.*``; a ``LlamaModel`` has no prefix) loads with the tied LM head."""
    tm, config = _save_torch(family, "causal_lm", tmp_path / "full")
    tm.model.save_pretrained(tmp_path / "bare")
    model = models.from_pretrained(tmp_path / "bare", task="causal_lm")
    ids, mask = _batch(1)
    real = mask.astype(bool)
    ref = _torch_logits(tm, ids, mask, "causal_lm")
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(got[real], ref[real], atol=1e-4, rtol=1e-4)


def test_checkpoint_keys_map_to_state_paths():
    llama = decoders.LlamaForTask(CONFIGS["llama"](), task="qa", rngs=nnx.Rngs(0))
    # LlamaForQuestionAnswering saves its backbone under "transformer.".
    assert (
        llama.hf_key_to_path("transformer.layers.1.self_attn.k_proj.weight")
        == "model/layers/1/self_attn/k_proj/kernel"
    )
    assert llama.hf_key_to_path("model.norm.weight") == "model/norm/scale"
    assert llama.hf_key_to_path("qa_outputs.bias") == "qa_outputs/bias"
    assert llama.hf_key_to_path("lm_head.weight") is None  # not this task's head
    assert llama.hf_key_to_path("model.rotary_emb.inv_freq") is None  # a buffer
    opt = decoders.OPTForTask(CONFIGS["opt"](), task="causal_lm", rngs=nnx.Rngs(0))
    assert (
        opt.hf_key_to_path("decoder.embed_positions.weight")
        == "model/decoder/embed_positions/embedding"
    )
    assert (
        opt.hf_key_to_path("model.decoder.layers.0.self_attn_layer_norm.bias")
        == "model/decoder/layers/0/self_attn_layer_norm/bias"
    )
    assert opt.hf_key_to_path("lm_head.weight") is None  # tied to embed_tokens
    assert opt.head_prefixes == ()


def test_last_token_index_by_hand():
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(decoders.last_token_index(mask), [2, 4, 4, 0])


def test_classification_without_pad_token_uses_attention_mask(tmp_path):
    """Llama 2 has no pad token: transformers refuses batches > 1; we pool the last real token,
    i.e. each row gives what transformers gives for that row alone (unpadded)."""
    config = CONFIGS["llama"]()
    config.pad_token_id = None
    config.num_labels = 3
    torch.manual_seed(0)
    tm = transformers.LlamaForSequenceClassification(config).eval()
    _randomize(tm, 0)
    tm.save_pretrained(tmp_path)
    model = models.from_pretrained(tmp_path, task="classification", num_labels=3)
    ids, mask = _batch(2)
    got = np.asarray(model(jnp.asarray(ids[:3]), jnp.asarray(mask[:3])))
    for row in range(3):
        n = int(mask[row].sum())
        ref = _torch_logits(tm, ids[row : row + 1, :n], mask[row : row + 1, :n], "classification")
        np.testing.assert_allclose(got[row], ref[0], atol=1e-4, rtol=1e-4)


def test_mean_pooling_by_hand(tmp_path):
    _save_torch("llama", "classification", tmp_path)
    model = models.from_pretrained(tmp_path, task="classification", num_labels=3, pooling="mean")
    lm = models.from_pretrained(tmp_path, task="causal_lm")
    ids, mask = _batch(3)
    hidden = np.asarray(lm.model(jnp.asarray(ids), jnp.asarray(mask)))
    m = mask[..., None].astype(np.float32)
    pooled = (hidden * m).sum(1) / m.sum(1)
    want = pooled @ np.asarray(model.score.kernel[...])
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_rope_inv_freq_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for params in (
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        CONFIGS["llama_tied"]().rope_parameters,
    ):
        config = transformers.LlamaConfig(
            hidden_size=64, num_attention_heads=4, rope_parameters=dict(params)
        )
        ref, scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](config)
        assert scaling == 1.0
        np.testing.assert_allclose(decoders.rope_inv_freq(config, 16), ref.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        decoders.rope_inv_freq(
            transformers.LlamaConfig(rope_parameters={"rope_type": "yarn", "factor": 2.0}), 16
        )


def test_bad_arguments_name_the_field():
    config = CONFIGS["llama"]()
    with pytest.raises(ValueError, match="task='seq2seq'"):
        decoders.LlamaForTask(config, task="seq2seq", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="pooling='cls'"):
        decoders.LlamaForTask(config, pooling="cls", rngs=nnx.Rngs(0))
    config.num_key_value_heads = 3
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        decoders.LlamaForTask(config, rngs=nnx.Rngs(0))
    opt = CONFIGS["opt"]()
    opt.num_attention_heads = 5
    with pytest.raises(ValueError, match="num_attention_heads=5"):
        decoders.OPTForTask(opt, rngs=nnx.Rngs(0))


def test_bfloat16_close_to_float32(tmp_path):
    _save_torch("llama", "causal_lm", tmp_path)
    ids, mask = _batch()
    f32 = np.asarray(models.from_pretrained(tmp_path, task="causal_lm")(ids, mask))
    model = models.from_pretrained(tmp_path, task="causal_lm", dtype="bfloat16")
    assert model.model.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
    bf16 = np.asarray(model(ids, mask))
    real = mask.astype(bool)
    err = np.abs(bf16[real] - f32[real]).max() / np.abs(f32[real]).max()
    assert err < 3e-2, err


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_base_is_the_rounded_float_model(mode, tmp_path):
    """An int8/int4 base computes exactly the float model whose Linear kernels are replaced by
    their quantise-dequantise round trip (so dequantisation happens inside each layer, with no
    other change), and stays close to the float32 model."""
    _save_torch("opt", "classification", tmp_path)
    ids, mask = _batch()
    qmodel = models.from_pretrained(tmp_path, num_labels=3, quant=mode)
    fmodel = models.from_pretrained(tmp_path, num_labels=3)
    f32 = np.asarray(fmodel(ids, mask))
    for path, module in peft.iter_modules(fmodel):
        if isinstance(module, Linear) and not path.startswith("score"):
            assert isinstance(module.kernel, nnx.Param)
            w = module.kernel[...]
            q, s = quant.quantize(w, mode, module.group_size)
            module.kernel[...] = quant.dequantize(q, s, mode, jnp.float32)
    np.testing.assert_allclose(np.asarray(qmodel(ids, mask)), fmodel(ids, mask), atol=2e-5)
    q_logits = np.asarray(qmodel(ids, mask))
    err = np.abs(q_logits - f32).max() / np.abs(f32).max()
    assert err < {"int8": 0.03, "int4": 0.4}[mode], err


def _lora_split(family, task, tmp_path, dropout=0.0):
    _save_torch(family, task, tmp_path)
    cfg = dict(method="lora", lora_rank=2, lora_alpha=4.0, lora_dropout=dropout)
    model = models.from_pretrained(tmp_path, task=task, num_labels=3, peft=cfg, dropout=dropout)
    return model, models.split_model(model, cfg)


@pytest.mark.parametrize("family,task", [("opt", "qa"), ("llama", "classification")])
def test_lora_b_zero_and_jvp_equals_grad(family, task, tmp_path):
    model, sm = _lora_split(family, task, tmp_path, dropout=0.1)
    ids, mask = _batch()
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    base = models.from_pretrained(tmp_path, task=task, num_labels=3)
    np.testing.assert_allclose(
        np.asarray(sm.apply_fn(sm.trainable, sm.frozen, ids, mask)),
        np.asarray(base(ids, mask)),
        atol=1e-6,
    )
    # LoRA on q_proj/v_proj of every layer, A before B, the head last; in the release's order
    # (transformers' named_parameters()): OPT's attention lists k, v, q, Llama's q, k, v.
    first, second = ("v_proj", "q_proj") if family == "opt" else ("q_proj", "v_proj")
    lora = [k for k in sm.order if k not in sm.head_keys]
    assert len(lora) == 2 * 2 * 2 and all(first in k for k in lora[:2])
    assert lora[2].endswith(f"{second}/lora_a") and lora[3].endswith(f"{second}/lora_b")
    assert sm.order[len(lora) :] == sm.head_keys

    rng = np.random.default_rng(0)
    # Non-zero B so that the tangent of A matters too.
    w = {k: jnp.asarray(rng.normal(size=v.shape) * 0.3, v.dtype) for k, v in sm.trainable.items()}
    v = {k: jnp.asarray(rng.normal(size=x.shape), x.dtype) for k, x in w.items()}
    probe = jnp.asarray(rng.normal(size=base(ids, mask).shape), jnp.float32)
    key = jax.random.key(7)  # dropout on: the same mask in both passes

    def loss(t):
        return jnp.sum(sm.apply_fn(t, sm.frozen, ids, mask, key) * probe)

    @jax.jit
    def jvp_and_grad(w, v):
        return jax.jvp(loss, (w,), (v,))[1], jax.grad(loss)(w)

    jvp, grad = jvp_and_grad(w, v)
    dot = sum(jnp.vdot(grad[k], v[k]) for k in w)
    np.testing.assert_allclose(float(jvp), float(dot), rtol=1e-4, atol=1e-4)


def test_dropout_is_keyed_and_none_is_deterministic(tmp_path):
    _, sm = _lora_split("opt", "causal_lm", tmp_path, dropout=0.1)
    ids, mask = (jnp.asarray(a) for a in _batch())
    t, f = sm.trainable, sm.frozen
    det = np.asarray(sm.apply_fn(t, f, ids, mask))
    a = np.asarray(sm.apply_fn(t, f, ids, mask, jax.random.key(1)))
    b = np.asarray(sm.apply_fn(t, f, ids, mask, jax.random.key(1)))
    c = np.asarray(sm.apply_fn(t, f, ids, mask, jax.random.key(2)))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - det).max() > 1e-3 and np.abs(a - c).max() > 1e-3
    np.testing.assert_array_equal(det, np.asarray(sm.apply_fn(t, f, ids, mask, None)))


@pytest.mark.parametrize(
    "name,cls",
    [
        ("llama2-7b", transformers.LlamaForCausalLM),
        ("opt-6.7b", transformers.OPTForCausalLM),
        ("opt-13b", transformers.OPTForCausalLM),
        ("smollm2", transformers.LlamaForCausalLM),
    ],
)
def test_paper_decoders_build_without_hub_and_match_parameter_count(name, cls):
    config = transformers.AutoConfig.for_model(**registry.MODELS[name].config)
    with torch.device("meta"):
        want = sum(p.numel() for p in cls(config).parameters())
    model = models.abstract_model(name, task="causal_lm")
    leaves = jax.tree.leaves(nnx.state(model))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert sum(int(np.prod(x.shape)) for x in leaves) == want
    if name == "llama2-7b":
        assert want == 6_738_415_616  # the published count


def test_llama2_7b_int4_weight_memory_by_hand():
    model = models.abstract_model("llama2-7b", task="causal_lm", quant="int4")
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))
    d, f, layers, vocab = 4096, 11008, 32, 32000
    # Packed nibbles (0.5 byte/weight) + one float32 scale per 128 input rows and output.
    kernels = layers * (4 * d * d + 3 * d * f) // 2
    scales = layers * 4 * (4 * (d // 128) * d + 2 * (d // 128) * f + (f // 128) * d)
    float32 = 4 * (2 * vocab * d + (2 * layers + 1) * d)  # embeddings, LM head, RMSNorms
    assert nbytes == kernels + scales + float32
    assert nbytes / (6_738_415_616 * 4) < 0.17  # vs a float32 base
