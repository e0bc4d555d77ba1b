"""Weight-only quantisation of frozen Linear kernels (int8 per output channel, int4 grouped).

The frozen base of a large model is stored quantised and dequantised *inside* each layer's call,
so at no time does a full-precision copy of all weights exist (the paper's Llama2-7B and OPT-13B
runs use a 4-bit base with float32 compute). Kernels use the ``[in, out]`` layout of
:class:`spry_jax.models.layers.Linear`.

* ``int8``: symmetric, one float32 scale per output channel: ``w ~= q * scale[None, :]``,
  ``q`` in [-127, 127]. Storage: 1 byte per weight + 4 bytes per output channel.
* ``int4``: one scale per (group of ``g`` consecutive input rows, output channel) and codes
  ``u`` in [0, 15], two packed into one ``uint8`` along the input axis (row ``2i`` in the low
  nibble, ``2i+1`` in the high nibble): ``w = (u - z) * scale``. Our own round-to-nearest
  quantisation is symmetric: ``z = 8`` for every group (no zero points stored), float32 scales.
  Storage: 0.5 byte per weight + 4 bytes per group and output channel (0.25 bit/weight at
  group 128). GPTQ checkpoints (:mod:`spry_jax.models.gptq`) use the same layout with the
  checkpoint's float16 scales and, when asymmetric, one ``uint8`` zero point ``z`` per group
  and output channel; rows are grouped as GPTQ groups them (the last group may be shorter).

qwix (Google's JAX quantisation library) was considered twice (README, "GPTQ bases"); it
intercepts Flax modules by rewriting their ``__call__`` and targets quantised
training/serving, while Spry needs only a frozen weight-only base that stays transparent to
``jax.jvp``, with GPTQ's zero points. Explicit quantise/dequantise does that with no
interception and is easy to audit.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

Array = jnp.ndarray

QUANT_MODES = ("none", "int8", "int4")
DEFAULT_INT4_GROUP = 128


def check_quant(quant: str) -> str:
    """Returns ``quant`` if it is a known mode, else raises a ValueError naming the options."""
    if quant not in QUANT_MODES:
        raise ValueError(f"quant={quant!r} is not supported; use one of {QUANT_MODES}.")
    return quant


def int4_group_size(in_features: int, group_size: int = DEFAULT_INT4_GROUP) -> int:
    """The largest group size <= ``group_size`` that divides ``in_features``."""
    for g in range(min(group_size, in_features), 0, -1):
        if in_features % g == 0:
            return g
    return 1


def quantize(
    w: Array, quant: str, group_size: int = DEFAULT_INT4_GROUP
) -> tuple[Array, Array | None]:
    """Quantises a float ``[in, out]`` kernel.

    Args:
      w: the kernel, ``[in_features, out_features]``.
      quant: "none" (returned unchanged), "int8" or "int4".
      group_size: int4 only; rounded down to a divisor of ``in_features``.

    Returns:
      ``(qweight, scale)``: int8 ``[in, out]`` and float32 ``[out]``; or packed uint8
      ``[in / 2, out]`` and float32 ``[in / g, out]``; or ``(w, None)`` for "none".
    """
    check_quant(quant)
    if quant == "none":
        return w, None
    xp = np if isinstance(w, np.ndarray) else jnp
    w32 = w.astype(xp.float32)
    if quant == "int8":
        amax = xp.max(xp.abs(w32), axis=0)
        scale = xp.where(amax > 0, amax / 127.0, 1.0).astype(xp.float32)
        q = xp.clip(xp.round(w32 / scale[None, :]), -127, 127).astype(xp.int8)
        return q, scale
    n_in, n_out = w32.shape
    if n_in % 2:
        raise ValueError(f"int4 packing needs an even number of input features, got {n_in}.")
    g = int4_group_size(n_in, group_size)
    grouped = w32.reshape(n_in // g, g, n_out)
    amax = xp.max(xp.abs(grouped), axis=1)
    scale = xp.where(amax > 0, amax / 7.0, 1.0).astype(xp.float32)
    q = xp.clip(xp.round(grouped / scale[:, None, :]), -8, 7).reshape(n_in, n_out)
    u = (q + 8).astype(xp.uint8)
    packed = (u[0::2] | (u[1::2] << 4)).astype(xp.uint8)
    return packed, scale


def dequantize(
    qweight: Array,
    scale: Array | None,
    quant: str,
    dtype,
    zero: Array | None = None,
    group_size: int | None = None,
) -> Array:
    """Inverse of :func:`quantize`: the ``[in, out]`` kernel in ``dtype``.

    Args:
      qweight, scale: as :func:`quantize` returns them (int4 scales ``[n_groups, out]``, any
        float dtype).
      quant: "none", "int8" or "int4".
      dtype: the result's dtype (also the dtype the arithmetic runs in).
      zero: int4 only: integer zero points ``[n_groups, out]``; None means 8 (symmetric).
      group_size: int4 only: input rows per group (row ``i`` is in group ``i // group_size``,
        the last group may be shorter); None means ``in / n_groups``.
    """
    if quant == "none":
        return qweight.astype(dtype)
    if quant == "int8":
        return qweight.astype(dtype) * scale[None, :].astype(dtype)
    if quant == "int4":
        half_in, n_out = qweight.shape
        n_in = 2 * half_in
        lo = (qweight & 0x0F).astype(jnp.int8)
        hi = (qweight >> 4).astype(jnp.int8)
        u = jnp.stack([lo, hi], axis=1).reshape(n_in, n_out)
        n_groups = scale.shape[0]
        g = n_in // n_groups if group_size is None else int(group_size)
        if -(-n_in // g) != n_groups:
            raise ValueError(
                f"int4 kernel with {n_in} input rows and {n_groups} scale groups does not fit "
                f"group_size={g}."
            )
        if zero is None:
            offset = (u - 8).astype(dtype)
        else:
            offset = u.astype(dtype) - _rows(zero, g, n_in).astype(dtype)
        if n_groups * g == n_in:
            grouped = offset.reshape(n_groups, g, n_out) * scale[:, None, :].astype(dtype)
            return grouped.reshape(n_in, n_out)
        return offset * _rows(scale, g, n_in).astype(dtype)
    raise ValueError(f"quant={quant!r} is not supported; use one of {QUANT_MODES}.")


def _rows(per_group: Array, g: int, n_in: int) -> Array:
    """``[n_groups, out]`` -> ``[n_in, out]``, row ``i`` taken from group ``i // g``."""
    return jnp.repeat(per_group, g, axis=0, total_repeat_length=n_in)


def quantized_nbytes(
    in_features: int,
    out_features: int,
    quant: str,
    dtype=jnp.float32,
    *,
    group_size: int | None = None,
    scale_bytes: int = 4,
    zero_points: bool = False,
    act_order: bool = False,
) -> int:
    """Bytes a kernel of this shape occupies in storage (the expected weight memory).

    The keyword arguments describe other int4 layouts than our own round-to-nearest one
    (defaults): a GPTQ kernel (:mod:`spry_jax.models.gptq`) has ``group_size`` from its
    checkpoint, float16 scales (``scale_bytes=2``), a ``uint8`` zero point per group and
    output channel when asymmetric, and an ``int32`` input permutation when act-order.
    """
    check_quant(quant)
    if quant == "none":
        return in_features * out_features * jnp.dtype(dtype).itemsize
    if quant == "int8":
        return in_features * out_features + 4 * out_features
    g = int4_group_size(in_features) if group_size is None else group_size
    n_groups = -(-in_features // g)
    per_group = scale_bytes + (1 if zero_points else 0)
    perm = 4 * in_features if act_order else 0
    return in_features * out_features // 2 + per_group * n_groups * out_features + perm
