"""Cheap random bits for dropout masks: a counter-based hash behind a JAX PRNG implementation.

A dropout mask needs one uniform word per activation, and on CPU (and GPU) JAX's default
threefry2x32 spends ~20 rounds of integer arithmetic on each pair of words: a dropout-heavy
client step spends a large share of its time generating masks (scripts/bench_random_bits.py
measures it). ``lax.rng_bit_generator`` (the ``rbg`` / ``unsafe_rbg`` implementations) is
cheaper but not usable here: under ``vmap`` it draws every client's bits from the *first*
client's key (its batching rule), so a vmapped round would no longer equal the loop of clients
and a chunked round would depend on the chunk size.

:data:`HASH_IMPL` keeps threefry's key derivation (``split``, ``fold_in`` and ``seed`` are
threefry's, so every derived key's data is bit-identical to threefry's) and replaces only the
bulk bits: element ``i`` of a draw with key words ``(k0, k1)`` is
``fmix32(fmix32(i * 0x9E3779B9 + k0) ^ k1)`` (MurmurHash3's 32-bit finaliser twice), a pure
elementwise function of the key and the element's index. So a draw under ``vmap``, under a
sharded or chunked map and in a Python loop gives the same bits, and the same key gives the same
mask on every backend. It is a statistical generator for dropout masks, not a cryptographic or
general-purpose one; tangents (which the server regenerates in per-iteration mode) stay on
threefry.

``model.dropout_bits`` (``"hash"``, the default, or ``"threefry"``) picks the scheme;
:func:`dropout_key` turns a step's (threefry) dropout key into the scheme's key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import random as jex_random

from spry_jax.config import DROPOUT_BITS

_GOLDEN = np.uint32(0x9E3779B9)


def _fmix32(h: jax.Array) -> jax.Array:
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(key_data: jax.Array, count: int, offset: int = 0) -> jax.Array:
    """``count`` hashed 32-bit words of one key (``uint32[2]``), element ``offset + i``."""
    i = jax.lax.iota(jnp.uint32, count)
    if offset:
        i = i + np.uint32(offset)
    return _fmix32(_fmix32(i * _GOLDEN + key_data[0]) ^ key_data[1])


def hash_random_bits(key_data: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
    """``random_bits`` of :data:`HASH_IMPL`: ``bit_width``-bit unsigned words of ``shape``."""
    size = int(np.prod(shape, dtype=np.int64))
    if size >= 2**32:
        raise ValueError(f"hash random bits draw at most 2**32 - 1 words at once, got {size}")
    words = _words(key_data, size)
    if bit_width == 32:
        out = words
    elif bit_width in (8, 16):
        out = (words >> (32 - bit_width)).astype(jnp.dtype(f"uint{bit_width}"))
    elif bit_width == 64:
        high = _words(key_data, size, offset=size).astype(jnp.uint64)  # wraps past 2**32: fine
        out = (high << 32) | words.astype(jnp.uint64)
    else:
        raise TypeError(f"hash random bits need an 8-, 16-, 32- or 64-bit width, got {bit_width}")
    return out.reshape(shape)


_THREEFRY = jex_random.threefry_prng_impl

HASH_IMPL = jex_random.define_prng_impl(
    key_shape=_THREEFRY.key_shape,
    seed=_THREEFRY.seed,
    split=_THREEFRY.split,
    fold_in=_THREEFRY.fold_in,
    random_bits=hash_random_bits,
    name="spry_hash",
    tag="sph",
)


# ``"rbg"`` (XLA's RngBitGenerator on threefry-derived key data) is accepted here for the
# benchmark only: not vmap-consistent (see the module docstring), so no config selects it.
BENCH_SCHEMES = (*DROPOUT_BITS, "rbg")


def check_dropout_bits(scheme: str) -> str:
    if scheme not in BENCH_SCHEMES:
        raise ValueError(f"model.dropout_bits={scheme!r}; choose one of {DROPOUT_BITS}.")
    return scheme


def dropout_key(key: jax.Array | None, scheme: str) -> jax.Array | None:
    """A step's dropout key in ``scheme``: threefry's key as is, or the same key data under
    :data:`HASH_IMPL` (so every key the model derives from it is threefry's, and only the
    masks' bits are hashed). None stays None (no dropout)."""
    check_dropout_bits(scheme)
    if key is None or scheme == "threefry":
        return key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    if scheme == "rbg":
        return jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl="rbg")
    return jax.random.wrap_key_data(key, impl=HASH_IMPL)
