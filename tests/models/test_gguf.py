"""GGUF loading: llama.cpp's RoPE row order, block dequantisation, and the real SmolLM2 asset.

References are independent of :mod:`spry_jax.models.gguf_loader`: the row permutation is
llama.cpp's own conversion formula (``convert_hf_to_gguf.py``: reshape to
``[heads, 2, head_dim/2, in]`` and swap the two middle axes), the block formats are decoded by
hand from the GGML spec, and the real asset is compared with transformers' own GGUF reader
(``load_gguf_checkpoint``) feeding its PyTorch ``LlamaForCausalLM``.
"""

from __future__ import annotations

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from spry_jax import assets
from spry_jax.models import from_pretrained, gguf_loader, load_tokenizer


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's HF -> GGUF q/k row permutation (the forward direction)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def test_unpermute_hand_example():
    # One head of size 4: HF rotates the pairs (0, 2) and (1, 3); llama.cpp stores each pair
    # adjacently, i.e. GGUF rows are HF rows [0, 2, 1, 3].
    gguf_rows = np.array([[0.0], [2.0], [1.0], [3.0]])
    np.testing.assert_array_equal(
        gguf_loader.unpermute_rope_rows(gguf_rows, 1)[:, 0], [0.0, 1.0, 2.0, 3.0]
    )


@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_unpermute_inverts_llama_cpp(n_head):
    rng = np.random.default_rng(n_head)
    w = rng.normal(size=(n_head * 64, 5)).astype(np.float32)
    np.testing.assert_array_equal(
        gguf_loader.unpermute_rope_rows(llama_cpp_permute(w, n_head), n_head), w
    )
    b = rng.normal(size=(n_head * 8,))
    np.testing.assert_array_equal(
        gguf_loader.unpermute_rope_rows(llama_cpp_permute(b, n_head), n_head), b
    )


def test_unpermute_rejects_bad_head_count():
    with pytest.raises(ValueError, match="num_heads=3"):
        gguf_loader.unpermute_rope_rows(np.zeros((8, 2)), 3)


# llama.cpp's tensor names, written out independently of the loader's own table.
_HF_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _write_tiny_gguf(path, config, state_dict, arch="llama"):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    w.add_rope_freq_base(config.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_pad_token_id(config.pad_token_id)
    for key, t in state_dict.items():
        a = t.detach().numpy().astype(np.float32)
        if key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        elif key == "lm_head.weight":
            name = "output.weight"
        else:
            _, _, layer, rest = key.split(".", 3)
            name = f"blk.{layer}.{_HF_TO_GGUF[rest]}"
            if rest.startswith("self_attn.q_proj"):
                a = llama_cpp_permute(a, config.num_attention_heads)
            elif rest.startswith("self_attn.k_proj"):
                a = llama_cpp_permute(a, config.num_key_value_heads)
        w.add_tensor(name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return config, transformers.LlamaForCausalLM(config).eval()


def test_tiny_gguf_matches_torch(tmp_path, tiny_llama):
    config, torch_model = tiny_llama
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, config, torch_model.state_dict())

    read = gguf_loader.read_gguf_config(path)
    assert (read.num_attention_heads, read.num_key_value_heads) == (4, 2)
    assert read.rope_parameters["rope_theta"] == 500.0 and not read.tie_word_embeddings

    ids = np.array([[5, 9, 13, 2, 40, 7], [3, 60, 0, 0, 0, 0]])
    mask = (np.arange(6)[None] < np.array([[6], [2]])).astype(np.int64)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    model = from_pretrained(path, task="causal_lm")
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    sel = mask.astype(bool)
    np.testing.assert_allclose(got[sel], ref.numpy()[sel], atol=1e-4, rtol=0)


def test_non_llama_gguf_is_refused(tmp_path, tiny_llama):
    path = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="general.architecture='gpt2'"):
        gguf_loader.read_gguf_config(path)


def test_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gguf_loader.find_gguf_file(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match="No .gguf file"):
        gguf_loader.find_gguf_file(tmp_path)
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="Several .gguf files"):
        gguf_loader.find_gguf_file(tmp_path)
    with pytest.raises(ValueError, match="Unknown GGUF tensor"):
        gguf_loader.gguf_to_hf_name("blk.0.attn_qkv.weight")


# ---------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct Q4_1 asset
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_file():
    return gguf_loader.find_gguf_file(assets.fetch("smollm2"))


def _hand_dequant_q4_1(raw: np.ndarray) -> np.ndarray:
    # GGML block_q4_1: fp16 d, fp16 m, 16 bytes of nibbles for 32 weights;
    # weight j < 16 is the low nibble of byte j, weight 16 + j its high nibble; w = q * d + m.
    blocks = raw.reshape(-1, 20)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    qs = blocks[:, 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
    return (q * d + m).reshape(-1)


def _hand_dequant_q8_0(raw: np.ndarray) -> np.ndarray:
    # GGML block_q8_0: fp16 d and 32 int8 weights; w = q * d.
    blocks = raw.reshape(-1, 34)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return (q * d).reshape(-1)


@pytest.mark.slow
def test_block_dequantisation_by_hand(smollm2_file):
    reader = gguf.GGUFReader(str(smollm2_file))
    tensors = {t.name: t for t in reader.tensors}
    config = gguf_loader.read_gguf_config(smollm2_file)
    state = gguf_loader.load_gguf_state_dict(smollm2_file, config)
    # v_proj is not RoPE-permuted, so the loader's array is the plain dequantisation.
    v = tensors["blk.3.attn_v.weight"]
    assert v.tensor_type == gguf.GGMLQuantizationType.Q4_1
    want = _hand_dequant_q4_1(np.asarray(v.data)).reshape(192, 576)
    np.testing.assert_array_equal(state["model.layers.3.self_attn.v_proj.weight"], want)
    # q_proj: the hand dequantisation, un-permuted by llama.cpp's inverse, i.e. permuting the
    # loader's rows forward gives back the file's row order.
    q = tensors["blk.3.attn_q.weight"]
    want_q = _hand_dequant_q4_1(np.asarray(q.data)).reshape(576, 576)
    got_q = state["model.layers.3.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(llama_cpp_permute(got_q, 9), want_q)
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type == gguf.GGMLQuantizationType.Q8_0
    rows = np.asarray(emb.data)[:50]
    np.testing.assert_array_equal(
        state["model.embed_tokens.weight"][:50], _hand_dequant_q8_0(rows).reshape(50, 576)
    )
    assert "lm_head.weight" not in state and config.tie_word_embeddings


@pytest.mark.slow
def test_smollm2_logits_match_transformers_gguf_load(smollm2_file):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    tok = load_tokenizer("smollm2")
    enc = tok(["The capital of France is", "Hello, my name"], padding=True, return_tensors="np")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert mask[1].sum() < mask.shape[1], "the batch should be padded"

    model = from_pretrained("smollm2", task="causal_lm")
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    del model

    config = gguf_loader.read_gguf_config(smollm2_file)
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(config)
    parsed = load_gguf_checkpoint(str(smollm2_file), return_tensors=True, model_to_load=skeleton)
    # transformers' reading of the metadata agrees with ours.
    theirs = parsed["config"]
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "rms_norm_eps",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "tie_word_embeddings",
    ):
        assert getattr(config, field) == theirs[field], field
    assert config.rope_parameters["rope_theta"] == theirs["rope_theta"] == 1e5
    tensors = parsed["tensors"]
    torch_model = transformers.LlamaForCausalLM(config).eval()
    result = torch_model.load_state_dict(tensors, strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys
    torch_model.tie_weights()
    assert torch_model.lm_head.weight.data_ptr() == torch_model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    ref = ref.numpy()

    sel = mask.astype(bool)
    scale = np.abs(ref[sel]).max()
    assert scale > 5.0
    # float32 through 30 layers with logits of magnitude ~30: agree to ~1e-5 relative.
    np.testing.assert_allclose(got[sel], ref[sel], atol=1e-3, rtol=0)
    # And the model is the real, working SmolLM2: greedy continuation of the prompt.
    assert tok.decode(int(got[0, -1].argmax())) == " Paris"
    assert int(ref[0, -1].argmax()) == int(got[0, -1].argmax())
