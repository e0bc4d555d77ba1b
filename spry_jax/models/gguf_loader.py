"""Load Llama-architecture GGUF checkpoints (e.g. the offline SmolLM2 asset) as HF tensors.

GGUF stores llama.cpp's view of a Llama model: its own tensor names, block-quantised weights,
and the rows of the query/key projections permuted so that llama.cpp can apply rotary
embeddings to *adjacent* pairs of features (interleaved RoPE), whereas transformers rotates the
two *halves* of each head (``rotate_half``). This module reads the file with the ``gguf``
package, dequantises every tensor to float, undoes the row permutation, and renames the tensors
to transformers' ``LlamaForCausalLM`` state-dict names in torch layout (``[out, in]``), so the
result loads exactly like a safetensors checkpoint.
"""

from __future__ import annotations

import functools
import pathlib
import re

import numpy as np
import transformers

__all__ = [
    "find_gguf_file",
    "gguf_to_hf_name",
    "load_gguf",
    "load_gguf_state_dict",
    "load_gguf_tokenizer",
    "read_gguf_config",
    "unpermute_rope_rows",
]

_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# Tensors llama.cpp writes that transformers' Llama has no parameter for (precomputed RoPE).
_IGNORED = ("rope_freqs.weight",)


def find_gguf_file(path: str | pathlib.Path) -> pathlib.Path:
    """Resolves ``path`` (a ``.gguf`` file, or a directory holding exactly one) to the file.

    Raises:
      FileNotFoundError: nothing at ``path``, or a directory without a ``.gguf`` file.
      ValueError: a directory with several ``.gguf`` files (pass the file itself).
    """
    p = pathlib.Path(path)
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(f"path={str(p)!r} is not a .gguf file; pass a GGUF checkpoint.")
        return p
    if p.is_dir():
        found = sorted(p.glob("*.gguf"))
        if not found:
            raise FileNotFoundError(
                f"No .gguf file in directory {str(p)!r}; pass the GGUF file or the directory "
                "that holds it (e.g. spry_jax.assets.fetch('smollm2'))."
            )
        if len(found) > 1:
            names = ", ".join(f.name for f in found)
            raise ValueError(f"Several .gguf files in {str(p)!r} ({names}); pass one file path.")
        return found[0]
    raise FileNotFoundError(f"GGUF path {str(p)!r} does not exist.")


def _reader(path: str | pathlib.Path):
    f = find_gguf_file(path).resolve()
    stat = f.stat()
    return _cached_reader(str(f), stat.st_mtime_ns, stat.st_size)


def _import_gguf():
    """The ``gguf`` package (an optional extra: GGUF checkpoints such as the ``smollm2`` asset)."""
    try:
        import gguf
    except ImportError as e:
        raise ImportError(
            "Reading a GGUF checkpoint (e.g. model.name=smollm2) needs the 'gguf' package, which "
            'the light install leaves out: pip install -e ".[gguf]" (or pip install gguf).'
        ) from e
    return gguf


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, mtime_ns: int, size: int):
    # Parsing the metadata (50k tokenizer strings) takes seconds; the reader itself only
    # memory-maps the file, so keeping the last two open is cheap. mtime/size key out stale files.
    gguf = _import_gguf()

    del mtime_ns, size
    return gguf.GGUFReader(path)


def _field(reader, key: str, default=None, *, required: bool = False):
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise ValueError(f"GGUF metadata key {key!r} is missing; cannot build the config.")
        return default
    return field.contents()


def read_gguf_config(path: str | pathlib.Path) -> transformers.LlamaConfig:
    """Builds the transformers ``LlamaConfig`` described by a GGUF file's metadata.

    Only ``general.architecture == "llama"`` is supported (SmolLM2, Llama 2/3 exports).
    Tied embeddings are inferred from the absence of an ``output.weight`` tensor.
    """
    reader = _reader(path)
    return _config_from_reader(reader)


def _config_from_reader(reader) -> transformers.LlamaConfig:
    arch = _field(reader, "general.architecture", required=True)
    if arch != "llama":
        raise ValueError(
            f"GGUF general.architecture={arch!r} is not supported; only 'llama' "
            "(Llama/SmolLM2) GGUF files can be loaded."
        )
    n_heads = int(_field(reader, "llama.attention.head_count", required=True))
    n_kv = int(_field(reader, "llama.attention.head_count_kv", n_heads))
    hidden = int(_field(reader, "llama.embedding_length", required=True))
    head_dim = int(_field(reader, "llama.rope.dimension_count", hidden // n_heads))
    if head_dim != hidden // n_heads:
        raise ValueError(
            f"GGUF llama.rope.dimension_count={head_dim} differs from embedding_length/head_count "
            f"={hidden // n_heads}; partial-rotary Llama variants are not supported."
        )
    vocab = _field(reader, "llama.vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ValueError("GGUF has neither llama.vocab_size nor tokenizer.ggml.tokens.")
        vocab = len(tokens.data)
    tensor_names = {t.name for t in reader.tensors}
    return transformers.LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length", required=True)),
        num_hidden_layers=int(_field(reader, "llama.block_count", required=True)),
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_parameters={
            "rope_type": "default",
            "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        },
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        attention_bias=any(n.endswith(".attn_q.bias") for n in tensor_names),
        mlp_bias=any(n.endswith(".ffn_up.bias") for n in tensor_names),
    )


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's interleaved-RoPE row order of a q/k projection ([out, in] or [out]).

    Within each head of size ``D``, llama.cpp stores the feature pairs rotated together next
    to each other (rows ``2i`` and ``2i+1``); transformers pairs feature ``i`` with ``i + D/2``.
    So HF row ``j * D/2 + i`` of a head is GGUF row ``2i + j`` of the same head.
    """
    rows = weight.shape[0]
    if rows % num_heads or (rows // num_heads) % 2:
        raise ValueError(
            f"Cannot un-permute {rows} rows over num_heads={num_heads}: the head size must be "
            "a whole even number."
        )
    head_dim = rows // num_heads
    half = head_dim // 2
    within = np.arange(head_dim)
    source_within = 2 * (within % half) + within // half
    source = (np.arange(num_heads)[:, None] * head_dim + source_within[None, :]).reshape(-1)
    return weight[source]


def gguf_to_hf_name(name: str) -> str | None:
    """Maps a llama.cpp tensor name to transformers' Llama state-dict name (None = ignored).

    Raises:
      ValueError: a tensor name this loader does not know.
    """
    if name in _IGNORED:
        return None
    m = _BLOCK_RE.match(name)
    if m:
        layer, part, kind = m.groups()
        if part not in _BLOCK_NAMES:
            raise ValueError(
                f"Unknown GGUF tensor {name!r} (block part {part!r}); only Llama-architecture "
                "files with separate q/k/v projections are supported."
            )
        return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"
    base, _, kind = name.rpartition(".")
    if base in _TOP_NAMES and kind in ("weight", "bias"):
        return f"{_TOP_NAMES[base]}.{kind}"
    raise ValueError(f"Unknown GGUF tensor {name!r}; only Llama-architecture files are supported.")


def load_gguf_state_dict(
    path: str | pathlib.Path,
    config: transformers.LlamaConfig | None = None,
    dtype: np.dtype | type = np.float32,
) -> dict[str, np.ndarray]:
    """Reads, dequantises and un-permutes every tensor of a Llama GGUF file.

    Args:
      path: the ``.gguf`` file or a directory holding exactly one.
      config: the model config (read from the file when omitted); supplies the head counts.
      dtype: numpy dtype of the returned arrays (dequantisation itself is float32).

    Returns:
      transformers ``LlamaForCausalLM`` state-dict names -> arrays in torch layout
      (``[out, in]`` for projections). ``lm_head.weight`` is absent when embeddings are tied.
    """
    reader = _reader(path)
    if config is None:
        config = _config_from_reader(reader)
    return _state_dict_from_reader(reader, config, dtype)


def _state_dict_from_reader(reader, config, dtype) -> dict[str, np.ndarray]:
    gguf = _import_gguf()

    out: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        hf_name = gguf_to_hf_name(tensor.name)
        if hf_name is None:
            continue
        # gguf.dequantize returns numpy's row-major shape (reversed GGUF ne order) = [out, in].
        w = np.asarray(gguf.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if ".q_proj." in hf_name:
            w = unpermute_rope_rows(w, config.num_attention_heads)
        elif ".k_proj." in hf_name:
            w = unpermute_rope_rows(w, config.num_key_value_heads)
        out[hf_name] = w.astype(dtype, copy=False)
    return out


def load_gguf(
    path: str | pathlib.Path, dtype: np.dtype | type = np.float32
) -> tuple[transformers.LlamaConfig, dict[str, np.ndarray]]:
    """Returns ``(config, state_dict)`` of a Llama GGUF file (see :func:`load_gguf_state_dict`)."""
    reader = _reader(path)
    config = _config_from_reader(reader)
    return config, _state_dict_from_reader(reader, config, dtype)


def load_gguf_tokenizer(path: str | pathlib.Path):
    """The tokenizer stored inside a GGUF file, through ``transformers.AutoTokenizer``."""
    f = find_gguf_file(path)
    return transformers.AutoTokenizer.from_pretrained(str(f.parent), gguf_file=f.name)
