"""From a data config to tokenized per-client train/test arrays.

load (registry) -> tokenize once, cached -> partition over all clients -> per-client 80/20
local train/test split -> (optionally) a validation split held out of each client's local train
part, for choosing hyper-parameters without looking at test. The round program then packs the
sampled clients with :func:`spry_jax.data.packing.pack_clients`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import numpy as np

from spry_jax.data import partition as part_lib
from spry_jax.data import qa as qa_lib
from spry_jax.data.errors import DataError
from spry_jax.data.registry import (
    TextDataset,
    load_dataset,
    resolve_data_config,
)
from spry_jax.data.tokenize import cached_arrays, tokenize_texts, tokenizer_fingerprint


@dataclasses.dataclass
class FederatedData:
    """Tokenized client data for a federated experiment.

    Attributes:
      task: "classification" or "qa".
      num_labels: classes (QA: 2, answerable or not).
      label_names: the label set.
      train, test: per client (all ``num_clients``), dicts of per-example arrays:
        ``input_ids``, ``attention_mask`` int32 [n, L], ``labels`` int32 [n]; QA also
        ``start_positions``, ``end_positions`` [n], ``offsets`` [n, L, 2], ``example_index`` [n]
        (QA rows are features; a long context gives several).
      fingerprint: sha256 naming dataset + partition + tokenizer + max length + seed.
      client_examples: per client, the dataset indices of its (train, test) examples.
      dataset: the loaded dataset (QA post-processing reads contexts and answers from it).
      heldout: tokenized held-out examples when ``data.heldout`` is set, else None.
      val: per client, the validation arrays held out of its local train split
        (``data.val_fraction``; zero rows when it is 0).
      val_examples: per client, the dataset indices of its validation examples.
    """

    task: str
    num_labels: int
    label_names: tuple[str, ...]
    train: list[dict[str, np.ndarray]]
    test: list[dict[str, np.ndarray]]
    fingerprint: str
    client_examples: list[tuple[np.ndarray, np.ndarray]]
    dataset: TextDataset
    heldout: dict[str, np.ndarray] | None = None
    val: list[dict[str, np.ndarray]] = dataclasses.field(default_factory=list)
    val_examples: list[np.ndarray] = dataclasses.field(default_factory=list)

    @property
    def num_clients(self) -> int:
        return len(self.train)

    def num_examples(self, client: int) -> int:
        """Local training examples (QA: features) of ``client``; the aggregation weight."""
        return int(len(self.train[client]["labels"]))

    def num_test_examples(self, client: int) -> int:
        """Local test examples (QA: features) of ``client``."""
        return int(len(self.test[client]["labels"]))

    def num_val_examples(self, client: int) -> int:
        """Local validation examples (QA: features) of ``client``."""
        return int(len(self.val[client]["labels"]))


def validation_split(
    train: np.ndarray, val_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Moves ``floor(val_fraction * n)`` of one client's ``n`` local train examples to a
    validation split.

    The train part keeps its order (so with nothing moved it is exactly the input), and rounding
    down leaves every client at least one train example.

    Returns:
      (train, val) index arrays, disjoint, their union the input.
    """
    train = np.asarray(train, dtype=np.int64)
    n_val = int(np.floor(len(train) * val_fraction + 1e-9))
    if n_val == 0:
        return train, train[:0]
    moved = np.zeros(len(train), dtype=bool)
    moved[rng.permutation(len(train))[:n_val]] = True
    return train[~moved], train[moved]


def _tokenize_all(
    ds: TextDataset, tokenizer: Any, tokenizer_fp: str | None, cfg: Any
) -> dict[str, np.ndarray]:
    """Tokenized arrays for every example (QA: every feature), from the cache when possible."""
    if ds.features is not None:
        arrays = {k: np.asarray(v, dtype=np.int32) for k, v in ds.features.items()}
        arrays["labels"] = ds.labels.astype(np.int32)
        return arrays
    if tokenizer is None:
        raise DataError(f"dataset {ds.name!r} needs a tokenizer (only 'synthetic' runs without)")
    max_length = int(cfg.max_length)
    key = {
        "dataset": ds.content_hash(),
        "tokenizer": tokenizer_fp,
        "max_length": max_length,
        "task": ds.task,
    }
    if ds.task == "qa":
        stride = int(cfg.qa_stride)
        key["stride"] = stride
        return cached_arrays(
            key,
            lambda: qa_lib.prepare_qa_features(
                ds.texts, ds.text_pairs, ds.answers, tokenizer, max_length=max_length, stride=stride
            ),
        )

    def compute():
        arrays = tokenize_texts(ds.texts, ds.text_pairs, tokenizer, max_length)
        arrays["labels"] = ds.labels.astype(np.int32)
        return arrays

    return cached_arrays(key, compute)


def _rows(arrays: dict[str, np.ndarray], examples: np.ndarray, task: str, row_of) -> dict:
    if task == "qa":
        rows = np.concatenate([row_of[int(e)] for e in examples]) if len(examples) else []
        rows = np.asarray(rows, dtype=np.int64)
    else:
        rows = examples
    return {k: v[rows] for k, v in arrays.items()}


def make_federated_data(
    data_cfg: Any, *, num_clients: int, tokenizer: Any, seed: int
) -> FederatedData:
    """Loads, tokenizes and partitions a dataset over ``num_clients`` clients.

    Args:
      data_cfg: ``name``, ``partition`` ("dirichlet" | "group_dirichlet" | "natural" | "iid";
        SQuAD v2 as in the paper: group_dirichlet; a SQuAD-format file: natural),
        ``alpha``, ``max_length``, ``test_fraction`` (0.2), ``val_fraction`` (0.0: the share of
        each client's local train split moved to its validation split,
        :func:`validation_split`),
        ``max_examples`` (0 = all), ``heldout`` (False: pool everything, as the paper does;
        True: keep the official test split, or a ``heldout_fraction`` hash split, out of the
        clients and return it as ``FederatedData.heldout``), QA: ``qa_stride`` (128); plus the
        source fields read by :func:`load_dataset`.
      num_clients: total clients.
      tokenizer: transformers tokenizer or ``tokenizers.Tokenizer``; None for ``synthetic``.
      seed: partition and local splits are deterministic in it.

    Returns:
      The :class:`FederatedData`.
    """
    data_cfg = resolve_data_config(data_cfg)
    ds = load_dataset(data_cfg)  # checks data_cfg first (check_data_config)
    tokenizer_fp = None
    if ds.features is None and tokenizer is not None:
        tokenizer_fp = tokenizer_fingerprint(tokenizer)
    arrays = _tokenize_all(ds, tokenizer, tokenizer_fp, data_cfg)
    # A local file's split column says which rows are test rows: they are always held out.
    use_heldout = bool(data_cfg.heldout) or ds.split_column is not None
    pool = np.flatnonzero(~ds.heldout) if use_heldout and ds.heldout is not None else None
    if pool is None:
        pool = np.arange(len(ds))
    if len(pool) == 0:
        raise DataError(
            f"dataset {ds.name!r}: every example is held out; unset data.heldout"
            + (
                f" or mark some rows 'train' in column {ds.split_column!r}"
                if ds.split_column
                else ""
            )
        )
    if use_heldout and not ds.heldout.any():
        raise DataError(
            f"data.heldout=True but dataset {ds.name!r} holds nothing out (no official test "
            "split, no 'test' rows); set data.heldout_fraction (e.g. 0.1) or unset data.heldout"
        )
    method = data_cfg.partition
    alpha = float(data_cfg.alpha)
    test_fraction = float(data_cfg.test_fraction)
    parts = part_lib.partition(
        method,
        labels=ds.labels[pool],
        groups=None if ds.group is None else ds.group[pool],
        num_clients=num_clients,
        alpha=alpha,
        seed=seed,
    )
    val_fraction = float(data_cfg.val_fraction)
    split_rng = np.random.default_rng([seed, 0x5EED])
    # A stream of its own, so the train/test split is the same with or without validation.
    val_rng = np.random.default_rng([seed, 0x7A1])
    client_examples = []
    val_examples = []
    for c, local in enumerate(parts):
        tr, te = part_lib.train_test_split(pool[local], test_fraction, split_rng, client=c)
        tr, va = validation_split(tr, val_fraction, val_rng)
        client_examples.append((tr, te))
        val_examples.append(va)
    if val_fraction > 0 and not any(len(v) for v in val_examples):
        raise DataError(
            f"data.val_fraction={val_fraction} leaves every client's validation split empty "
            "(clients are too small); raise it or use fewer clients"
        )
    row_of = None
    if ds.task == "qa":
        order = np.argsort(arrays["example_index"], kind="stable")
        bounds = np.searchsorted(arrays["example_index"][order], np.arange(len(ds) + 1))
        row_of = [order[bounds[i] : bounds[i + 1]] for i in range(len(ds))]
    train = [_rows(arrays, tr, ds.task, row_of) for tr, _ in client_examples]
    test = [_rows(arrays, te, ds.task, row_of) for _, te in client_examples]
    val = [_rows(arrays, va, ds.task, row_of) for va in val_examples]
    heldout = None
    if use_heldout:
        held = np.flatnonzero(ds.heldout) if ds.heldout is not None else np.arange(0)
        heldout = _rows(arrays, held, ds.task, row_of)
    fp = {
        "dataset": ds.content_hash(),
        "tokenizer": tokenizer_fp,
        "max_length": data_cfg.max_length,
        "qa_stride": data_cfg.qa_stride if ds.task == "qa" else None,
        "partition": method,
        "alpha": alpha if method in ("dirichlet", "group_dirichlet") else None,
        "num_clients": num_clients,
        "test_fraction": test_fraction,
        "heldout": use_heldout,
        "seed": seed,
    }
    if val_fraction > 0:  # only then, so runs without validation keep their fingerprint
        fp["val_fraction"] = val_fraction
    if ds.split_column is not None:  # which rows the file marks "test" (no config field says)
        fp["heldout_rows"] = hashlib.sha256(np.packbits(ds.heldout).tobytes()).hexdigest()
    return FederatedData(
        task=ds.task,
        num_labels=ds.num_labels,
        label_names=ds.label_names,
        train=train,
        test=test,
        fingerprint=hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest(),
        client_examples=client_examples,
        dataset=ds,
        heldout=heldout,
        val=val,
        val_examples=val_examples,
    )
