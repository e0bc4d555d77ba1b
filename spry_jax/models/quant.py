"""Weight-only quantisation of frozen Linear kernels (int8 per output channel, int4 grouped).

The frozen base of a large model is stored quantised and dequantised *inside* each layer's call,
so at no time does a full-precision copy of all weights exist (the paper's Llama2-7B and OPT-13B
runs use a 4-bit base with float32 compute). Kernels use the ``[in, out]`` layout of
:class:`spry_jax.models.layers.Linear`.

* ``int8``: symmetric, one float32 scale per output channel: ``w ~= q * scale[None, :]``,
  ``q`` in [-127, 127]. Storage: 1 byte per weight + 4 bytes per output channel.
* ``int4``: symmetric, one float32 scale per (group of ``group_size`` input rows, output
  channel), ``q`` in [-8, 7], two values packed into one ``uint8`` along the input axis
  (row ``2i`` in the low nibble, ``2i+1`` in the high nibble). Storage: 0.5 byte per weight +
  4 bytes per group and output channel (0.25 bit/weight at group 128).

qwix (Google's JAX quantisation library) was considered; it intercepts Flax modules by rewriting
their ``__call__`` and targets quantised training/serving, while Spry needs only a frozen
weight-only base that stays transparent to ``jax.jvp``. Twenty lines of explicit
quantise/dequantise do that with no interception and are easy to audit.
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


def dequantize(qweight: Array, scale: Array | None, quant: str, dtype) -> Array:
    """Inverse of :func:`quantize`: the ``[in, out]`` kernel in ``dtype``."""
    if quant == "none":
        return qweight.astype(dtype)
    if quant == "int8":
        return qweight.astype(dtype) * scale[None, :].astype(dtype)
    if quant == "int4":
        half_in, n_out = qweight.shape
        lo = (qweight & 0x0F).astype(jnp.int8)
        hi = (qweight >> 4).astype(jnp.int8)
        q = jnp.stack([lo, hi], axis=1).reshape(2 * half_in, n_out) - 8
        n_groups = scale.shape[0]
        grouped = q.reshape(n_groups, -1, n_out).astype(dtype) * scale[:, None, :].astype(dtype)
        return grouped.reshape(2 * half_in, n_out)
    raise ValueError(f"quant={quant!r} is not supported; use one of {QUANT_MODES}.")


def quantized_nbytes(in_features: int, out_features: int, quant: str, dtype=jnp.float32) -> int:
    """Bytes a kernel of this shape occupies in storage (the expected weight memory)."""
    check_quant(quant)
    if quant == "none":
        return in_features * out_features * jnp.dtype(dtype).itemsize
    if quant == "int8":
        return in_features * out_features + 4 * out_features
    g = int4_group_size(in_features)
    return in_features * out_features // 2 + 4 * (in_features // g) * out_features
