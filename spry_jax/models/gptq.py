"""GPTQ checkpoints as the frozen int4 base: read the packed 4-bit layout, no float on the host.

The layout (AutoGPTQ / GPTQModel / transformers+optimum, the "gptq" and "gptq_v2" checkpoint
formats, as their public code and model cards describe it). Every quantised
``torch.nn.Linear`` with ``in_features`` inputs and ``out_features`` outputs named ``P`` (e.g.
``model.layers.0.self_attn.q_proj``) is stored as four tensors instead of ``P.weight``:

* ``P.qweight``: ``int32 [in / 8, out]``. Eight 4-bit codes ``q`` in [0, 15] per word, packed
  along the *input* dimension, lowest nibble first: ``q[8 i + j, o] = (qweight[i, o] >> 4 j)
  & 0xF`` for ``j = 0..7`` (rows are the input features in their natural order, also with
  act-order).
* ``P.qzeros``: ``int32 [n_groups, out / 8]``. Eight 4-bit zero points per word, packed along
  the *output* dimension, lowest nibble first: ``stored[g, 8 k + j] = (qzeros[g, k] >> 4 j) &
  0xF``. Format "gptq" (v1, AutoGPTQ's classic convention) stores ``zero - 1``, so the zero
  point is ``stored + 1`` (1..16; a symmetric checkpoint stores 7 for a zero point of 8);
  format "gptq_v2" stores the zero point itself (0..15; 8 when symmetric).
* ``P.scales``: ``float16 [n_groups, out]``.
* ``P.g_idx``: ``int32 [in]``, the group of each input row. Without act-order
  ``g_idx[i] = i // group_size``. With act-order (``desc_act``) GPTQ visits the input
  features in a permuted order and forms its groups of ``group_size`` consecutive features in
  *that* order, so ``g_idx`` is the group of row ``i`` in an arbitrary order.
* ``P.bias``: as in the float model (when the layer has one).

The weight is ``W[o, i] = scales[g, o] * (q[i, o] - zero[g, o])`` with ``g = g_idx[i]``, and
``n_groups = ceil(in / group_size)`` (``group_size = -1``: one group over all inputs). Other
tensors (embeddings, norms, the LM head) are stored as float. The parameters come from
``config.json``'s ``quantization_config`` or from ``quantize_config.json``: ``quant_method``
"gptq", ``bits`` 4, ``group_size``, ``desc_act``, ``sym``, ``checkpoint_format`` (or
``format``) "gptq" | "gptq_v2"; anything else (other bit widths, packed formats such as
"marlin", per-module ``dynamic`` overrides, a quantised ``lm_head``) is refused by name.

How it lands in our int4 base (:mod:`spry_jax.models.quant`): the codes are unpacked on the host
to ``uint8`` (1 byte per weight, one layer at a time, never float) and re-packed two per byte
along the input axis; the float16 scales are kept as they are; zero points are dropped when
they are all 8 (symmetric) and otherwise kept as ``uint8 [n_groups, out]``. An act-order kernel
has its rows re-ordered at load time by a stable sort of ``g_idx`` (``perm``), which makes every
group a run of consecutive rows again, and the layer computes ``x[..., perm] @ W[perm]``: a
gather of the activations (``O(tokens * in)``, against the matmul's ``O(tokens * in * out)``)
rather than gathering a scale and zero row per kernel row inside every dequantisation, and one
int4 layout (consecutive groups) for the whole package, its lazy backward pass and its memory
accounting. Everything stays plain XLA, so ``jax.jvp`` goes through it.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

PARTS = ("qweight", "qzeros", "scales", "g_idx")
FORMATS = ("gptq", "gptq_v2")


@dataclasses.dataclass(frozen=True)
class GPTQConfig:
    """The quantisation parameters of a GPTQ checkpoint.

    Attributes:
      group_size: input rows per group; -1 = one group over all inputs.
      sym: symmetric (every zero point 8).
      desc_act: act-order (informational: the loader follows ``g_idx``).
      checkpoint_format: "gptq" (zero points stored minus one) or "gptq_v2".
      source: where it was read (for error messages).
    """

    group_size: int
    sym: bool
    desc_act: bool
    checkpoint_format: str
    source: str

    def group_for(self, in_features: int) -> int:
        """Rows per group for a layer with ``in_features`` inputs."""
        return in_features if self.group_size == -1 else self.group_size


def _parse(raw: Mapping[str, Any], source: str) -> GPTQConfig:
    def bad(field: str, value: Any, fix: str) -> ValueError:
        return ValueError(f"{source}: {field}={value!r} is not supported; {fix}.")

    method = raw.get("quant_method", "gptq")
    if str(method).lower() != "gptq":
        raise bad("quant_method", method, "only GPTQ checkpoints load as a quantised base")
    bits = raw.get("bits")
    if bits != 4:
        raise bad("bits", bits, "only 4-bit GPTQ checkpoints are supported")
    fmts = {k: raw[k] for k in ("checkpoint_format", "format") if raw.get(k) is not None}
    if len(set(fmts.values())) > 1:
        raise ValueError(f"{source}: checkpoint_format and format disagree: {fmts}.")
    fmt = str(next(iter(fmts.values()), "gptq")).lower()
    if fmt not in FORMATS:
        raise bad(
            "checkpoint_format",
            fmt,
            f"use one of {FORMATS} (re-save the model in the GPTQ format, e.g. with "
            "GPTQModel's format='gptq')",
        )
    pack = raw.get("pack_dtype")
    if pack is not None and str(pack).replace("torch.", "") != "int32":
        raise bad("pack_dtype", pack, "only int32 packing is supported")
    if raw.get("dynamic"):
        raise bad("dynamic", raw["dynamic"], "per-module GPTQ settings are not supported")
    if raw.get("lm_head"):
        raise bad("lm_head", True, "the task head is kept in float; quantise without lm_head")
    group = raw.get("group_size", 128)
    if not isinstance(group, int) or isinstance(group, bool) or (group < 1 and group != -1):
        raise bad("group_size", group, "use a positive group size or -1")
    return GPTQConfig(
        group_size=group,
        sym=bool(raw.get("sym", True)),
        desc_act=bool(raw.get("desc_act", False)),
        checkpoint_format=fmt,
        source=source,
    )


def read_config(src: pathlib.Path, hf_config: Any = None) -> GPTQConfig | None:
    """The GPTQ parameters of checkpoint directory ``src``, or None if it is not quantised.

    ``config.json``'s ``quantization_config`` (as ``hf_config.quantization_config`` or read from
    the file) comes first; a ``quantize_config.json`` (AutoGPTQ) is used when it is missing, and
    must agree with it when both are present.

    Raises:
      ValueError: a quantisation this loader does not support, named by field.
    """
    src = pathlib.Path(src)
    embedded = getattr(hf_config, "quantization_config", None) if hf_config is not None else None
    if embedded is None and (src / "config.json").exists():
        embedded = json.loads((src / "config.json").read_text()).get("quantization_config")
    if embedded is not None and not isinstance(embedded, Mapping):
        embedded = embedded.to_dict() if hasattr(embedded, "to_dict") else vars(embedded)
    qfile = src / "quantize_config.json"
    separate = json.loads(qfile.read_text()) if qfile.exists() else None
    if embedded is None and separate is None:
        return None
    if embedded is not None:
        cfg = _parse(embedded, f"{src / 'config.json'} quantization_config")
        if separate is not None:
            other = _parse(separate, str(qfile))
            fields = ("group_size", "sym", "checkpoint_format")
            diff = [f for f in fields if getattr(cfg, f) != getattr(other, f)]
            if diff:
                raise ValueError(
                    f"{qfile} disagrees with config.json's quantization_config on {diff}; "
                    "remove the stale one."
                )
        return cfg
    return _parse(separate, str(qfile))


def split_key(key: str) -> tuple[str, str] | None:
    """``"P.qweight"`` -> ``("P", "qweight")`` for the four GPTQ parts, else None."""
    base, _, part = key.rpartition(".")
    return (base, part) if base and part in PARTS else None


def unpack_rows(packed: np.ndarray) -> np.ndarray:
    """``int32 [n / 8, m]`` -> ``uint8 [n, m]``: nibble ``j`` of word ``i`` is row ``8 i + j``."""
    words = np.ascontiguousarray(packed).view(np.uint32)
    out = np.empty((words.shape[0], 8, words.shape[1]), np.uint8)
    for j in range(8):
        out[:, j, :] = (words >> np.uint32(4 * j)) & np.uint32(0xF)
    return out.reshape(-1, words.shape[1])


def unpack_cols(packed: np.ndarray) -> np.ndarray:
    """``int32 [n, m / 8]`` -> ``uint8 [n, m]``: nibble ``j`` of word ``k`` is column ``8 k + j``."""
    words = np.ascontiguousarray(packed).view(np.uint32)
    out = np.empty((words.shape[0], words.shape[1], 8), np.uint8)
    for j in range(8):
        out[:, :, j] = (words >> np.uint32(4 * j)) & np.uint32(0xF)
    return out.reshape(words.shape[0], -1)


@dataclasses.dataclass
class Int4Kernel:
    """One layer in our int4 layout (see :meth:`spry_jax.models.layers.Linear.set_int4`)."""

    codes: np.ndarray  # uint8 [in / 2, out], rows in ``perm`` order
    scale: np.ndarray  # [n_groups, out], the checkpoint's dtype
    group: int
    zero: np.ndarray | None  # uint8 [n_groups, out] or None (all 8)
    perm: np.ndarray | None  # int32 [in] or None (natural order)


def to_int4(
    parts: Mapping[str, np.ndarray],
    cfg: GPTQConfig,
    in_features: int,
    out_features: int,
    name: str,
) -> Int4Kernel:
    """Converts one layer's GPTQ tensors to our int4 layout (integer work only).

    Args:
      parts: ``qweight``, ``qzeros``, ``scales`` and (optionally, without act-order)
        ``g_idx``, as stored.
      cfg: the checkpoint's parameters.
      in_features, out_features: the layer's shape (the model's config).
      name: the layer's checkpoint prefix, for error messages.

    Raises:
      ValueError: a tensor of the wrong shape or dtype, or values the declared format cannot
        hold, named by tensor.
    """
    missing = [p for p in ("qweight", "qzeros", "scales") if p not in parts]
    if missing:
        raise ValueError(f"GPTQ layer {name!r} lacks {[f'{name}.{p}' for p in missing]}.")
    g = cfg.group_for(in_features)
    n_groups = -(-in_features // g)
    want = {
        "qweight": (in_features // 8, out_features),
        "qzeros": (n_groups, out_features // 8),
        "scales": (n_groups, out_features),
        "g_idx": (in_features,),
    }
    for part, arr in parts.items():
        if tuple(arr.shape) != want[part]:
            raise ValueError(
                f"{name}.{part} has shape {tuple(arr.shape)} but a {in_features}->{out_features} "
                f"Linear with group_size={cfg.group_size} expects {want[part]} "
                f"({cfg.source})."
            )
    for part in ("qweight", "qzeros"):
        if parts[part].dtype != np.int32:
            raise ValueError(f"{name}.{part} is {parts[part].dtype}; GPTQ packs into int32.")
    if in_features % 8 or out_features % 8:
        raise ValueError(f"GPTQ layer {name!r}: in/out features must be multiples of 8.")

    codes = unpack_rows(parts["qweight"])
    stored_zero = unpack_cols(parts["qzeros"])
    zero = stored_zero + np.uint8(1) if cfg.checkpoint_format == "gptq" else stored_zero
    if cfg.sym and not np.all(zero == 8):
        other = "gptq_v2" if cfg.checkpoint_format == "gptq" else "gptq"
        plus = 0 if other == "gptq_v2" else 1
        hint = (
            f"; they are as {other!r} stores them: set checkpoint_format={other!r}"
            if np.all(stored_zero + plus == 8)
            else ""
        )
        raise ValueError(
            f"{name}.qzeros: sym=True but the zero points are not all 8 under "
            f"checkpoint_format={cfg.checkpoint_format!r}{hint} ({cfg.source})."
        )

    if "g_idx" not in parts and cfg.desc_act:
        raise ValueError(f"GPTQ layer {name!r} lacks {name}.g_idx, which desc_act=True needs.")
    perm = None
    if "g_idx" in parts:
        g_idx = np.asarray(parts["g_idx"]).astype(np.int64)
        if g_idx.min() < 0 or g_idx.max() >= n_groups:
            raise ValueError(f"{name}.g_idx has groups outside [0, {n_groups}).")
        order = np.argsort(g_idx, kind="stable")
        if not np.array_equal(g_idx[order], np.arange(in_features) // g):
            raise ValueError(
                f"{name}.g_idx does not give every group {g} rows (group_size="
                f"{cfg.group_size}); this is not a GPTQ grouping."
            )
        if not np.array_equal(order, np.arange(in_features)):
            perm = order.astype(np.int32)
            codes = codes[perm]
    packed = (codes[0::2] | (codes[1::2] << np.uint8(4))).astype(np.uint8)
    return Int4Kernel(
        codes=packed,
        scale=np.asarray(parts["scales"]),
        group=g,
        zero=None if np.all(zero == 8) else zero.astype(np.uint8),
        perm=perm,
    )
