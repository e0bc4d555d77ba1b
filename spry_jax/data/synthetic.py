"""A synthetic token-classification dataset for smoke tests: no tokenizer, no network.

Token ids lie in ``[4, vocab_size)`` (0 is padding; 1-3 are left for special tokens). The ids
above 3 are cut into ``num_labels + 1`` contiguous blocks: block ``c < num_labels`` holds the
"marker" tokens of class ``c``, the last block is neutral. Each example is generated around a
latent class whose marker tokens are over-represented, and its label is then a deterministic
function of the tokens alone: the class whose marker tokens occur most often (ties go to the
lower class). A bag-of-tokens model can reach 100 %, and a tiny transformer learns it in a few
rounds because the latent class makes the margin large.
"""

from __future__ import annotations

import numpy as np

from spry_jax.data.errors import DataError

FIRST_TOKEN = 4
MARKER_PROB = 0.4


def marker_blocks(vocab_size: int, num_labels: int) -> np.ndarray:
    """Class of each token id (``-1`` for padding/special/neutral ids), shape [vocab_size]."""
    usable = vocab_size - FIRST_TOKEN
    block = usable // (num_labels + 1)
    cls = np.full(vocab_size, -1, dtype=np.int64)
    for c in range(num_labels):
        start = FIRST_TOKEN + c * block
        cls[start : start + block] = c
    return cls


def label_of(input_ids: np.ndarray, attention_mask: np.ndarray, vocab_size: int, num_labels: int):
    """The label function: argmax over classes of marker-token counts (real tokens only)."""
    cls = marker_blocks(vocab_size, num_labels)[input_ids]
    cls = np.where(attention_mask.astype(bool), cls, -1)
    counts = np.stack([(cls == c).sum(-1) for c in range(num_labels)], axis=-1)
    return counts.argmax(-1).astype(np.int32)


def make_synthetic(
    *, vocab_size: int, num_examples: int, num_labels: int, seq_len: int, seed: int
) -> dict[str, np.ndarray]:
    """Generates the dataset.

    Args:
      vocab_size: ids are drawn from ``[4, vocab_size)``; needs ``vocab_size >= 4 + 2 *
        (num_labels + 1)`` so each class gets at least two marker tokens.
      num_examples: number of examples.
      num_labels: number of classes (>= 2).
      seq_len: padded length; real lengths are uniform in ``[max(2, seq_len // 2), seq_len]``.
      seed: everything is a deterministic function of the arguments.

    Returns:
      ``input_ids`` and ``attention_mask`` int32 [num_examples, seq_len], ``labels`` int32.
    """
    if num_labels < 2:
        raise DataError(f"data.num_labels must be >= 2 for the synthetic dataset, got {num_labels}")
    if vocab_size < FIRST_TOKEN + 2 * (num_labels + 1):
        raise DataError(
            f"data.vocab_size={vocab_size} is too small for {num_labels} labels; "
            f"use at least {FIRST_TOKEN + 2 * (num_labels + 1)}"
        )
    if seq_len < 2:
        raise DataError(f"data.seq_len must be >= 2, got {seq_len}")
    if num_examples < 1:
        raise DataError(f"data.num_examples must be >= 1, got {num_examples}")
    rng = np.random.default_rng(seed)
    cls = marker_blocks(vocab_size, num_labels)
    latent = rng.integers(num_labels, size=num_examples)
    lengths = rng.integers(max(2, seq_len // 2), seq_len + 1, size=num_examples)
    uniform = rng.integers(FIRST_TOKEN, vocab_size, size=(num_examples, seq_len))
    markers = [np.flatnonzero(cls == c) for c in range(num_labels)]
    marker_pick = rng.random((num_examples, seq_len))
    marker_tok = np.stack(
        [m[rng.integers(len(m), size=(num_examples, seq_len))] for m in markers], axis=0
    )[latent, np.arange(num_examples)]
    ids = np.where(marker_pick < MARKER_PROB, marker_tok, uniform)
    mask = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, 0).astype(np.int32)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": label_of(ids, mask, vocab_size, num_labels),
    }
