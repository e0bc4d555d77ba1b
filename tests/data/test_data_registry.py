"""Dataset registry: real offline datasets, hub specs from a local copy, local files, errors."""

from __future__ import annotations

import json
import time
from collections import Counter

import numpy as np
import pytest
from ml_collections import ConfigDict

from spry_jax.data import DataError, dataset_names, load_dataset
from spry_jax.data.registry import hash_heldout


def cfg(**kw) -> ConfigDict:
    return ConfigDict(kw)


def test_rotten_tomatoes_loads_offline_with_expected_counts():
    ds = load_dataset(cfg(name="rotten_tomatoes"))
    assert len(ds) == 12808
    assert ds.label_names == ("rotten", "fresh")
    assert Counter(ds.labels.tolist()) == {1: 7403, 0: 5405}
    assert len(set(ds.group.tolist())) == 508
    assert ds.task == "classification" and ds.text_pairs is None
    assert all(isinstance(t, str) and t for t in ds.texts[:100])


def test_bbc_news_loads_offline_with_expected_counts():
    ds = load_dataset(cfg(name="bbc_news"))
    assert len(ds) == 2225
    assert ds.label_names == ("business", "entertainment", "politics", "sports", "tech")
    assert np.bincount(ds.labels).tolist() == [510, 386, 417, 511, 401]
    assert ds.texts[0].startswith("Ad sales boost Time Warner profit")
    assert all("\n" not in t for t in ds.texts)


def test_max_examples_is_a_deterministic_subsample():
    a = load_dataset(cfg(name="bbc_news", max_examples=300))
    b = load_dataset(cfg(name="bbc_news", max_examples=300))
    full = load_dataset(cfg(name="bbc_news"))
    assert len(a) == 300 and a.texts == b.texts
    assert set(a.texts) <= set(full.texts)
    assert len(set(a.labels.tolist())) == 5


def test_hash_heldout_is_deterministic_and_about_the_fraction():
    keys = [f"example {i}" for i in range(4000)]
    mask = hash_heldout(keys, 0.1)
    assert 0.08 < mask.mean() < 0.12
    # Independent of order: the same key is always on the same side.
    rev = hash_heldout(keys[::-1], 0.1)[::-1]
    np.testing.assert_array_equal(mask, rev)


def _save_glue_like(tmp_path, pair: bool):
    import datasets

    names = ["negative", "positive"] if not pair else ["entailment", "neutral", "contradiction"]
    feats = {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=names)}
    if pair:
        feats = {
            "premise": datasets.Value("string"),
            "hypothesis": datasets.Value("string"),
            "label": datasets.ClassLabel(names=names),
        }

    def split(n, labelled=True, tag="x"):
        rows = {"label": [i % len(names) if labelled else -1 for i in range(n)]}
        if pair:
            rows["premise"] = [f"{tag} premise {i}" for i in range(n)]
            rows["hypothesis"] = [f"{tag} hypothesis {i}" for i in range(n)]
        else:
            rows["sentence"] = [f"{tag} sentence {i}" for i in range(n)]
        return datasets.Dataset.from_dict(rows, features=datasets.Features(feats))

    if pair:
        dd = datasets.DatasetDict(
            train=split(12, tag="tr"),
            validation_matched=split(3, tag="vm"),
            test_matched=split(4, labelled=False, tag="te"),
        )
    else:
        dd = datasets.DatasetDict(
            train=split(10, tag="tr"), validation=split(4, tag="va"), test=split(5, False, "te")
        )
    path = tmp_path / ("mnli" if pair else "sst2")
    dd.save_to_disk(str(path))
    return path


def test_hub_dataset_from_a_local_copy_sst2(tmp_path):
    path = _save_glue_like(tmp_path, pair=False)
    ds = load_dataset(cfg(name="sst2", path=str(path)))
    # Labelled splits pooled (train + validation); the unlabelled GLUE test split is dropped.
    assert len(ds) == 14
    assert ds.label_names == ("negative", "positive")
    assert ds.texts[0] == "tr sentence 0" and ds.texts[-1] == "va sentence 3"
    assert ds.heldout.tolist() == [False] * 10 + [True] * 4
    assert ds.text_pairs is None


def test_hub_dataset_from_a_local_copy_mnli_pairs(tmp_path):
    path = _save_glue_like(tmp_path, pair=True)
    ds = load_dataset(cfg(name="mnli", path=str(path)))
    assert len(ds) == 15
    assert ds.text_pairs[0] == "tr hypothesis 0" and ds.texts[0] == "tr premise 0"
    assert ds.num_labels == 3


def test_hub_dataset_missing_text_column(tmp_path):
    path = _save_glue_like(tmp_path, pair=False)
    with pytest.raises(DataError, match=r"missing text column\(s\) \['premise', 'hypothesis'\]"):
        load_dataset(cfg(name="snli", path=str(path)))


def test_hub_name_offline_fails_fast_with_instructions(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty HF cache
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="could not load dataset 'ag_news'.*save_to_disk"):
        load_dataset(cfg(name="ag_news"))
    assert time.perf_counter() - t0 < 20


def _write_local(tmp_path, fmt: str):
    import pandas as pd

    df = pd.DataFrame(
        {
            "review": ["great film", "dull", "loved it", "awful plot", "fine"],
            "stars": ["pos", "neg", "pos", "neg", "pos"],
            "user": ["u1", "u2", "u1", "u3", "u2"],
        }
    )
    path = tmp_path / f"reviews.{fmt}"
    if fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_parquet(path)
    return path


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_local_files_with_column_mapping(tmp_path, fmt):
    path = _write_local(tmp_path, fmt)
    ds = load_dataset(
        cfg(
            name=fmt,
            path=str(path),
            columns={"text": "review", "label": "stars", "group": "user"},
        )
    )
    assert ds.texts == ["great film", "dull", "loved it", "awful plot", "fine"]
    assert ds.label_names == ("neg", "pos")
    assert ds.labels.tolist() == [1, 0, 1, 0, 1]
    assert ds.group.tolist() == ["u1", "u2", "u1", "u3", "u2"]


def test_local_file_errors(tmp_path):
    path = _write_local(tmp_path, "csv")
    with pytest.raises(
        DataError,
        match=r"data.columns.text='body': no such column.*available columns: \['review', 'stars'",
    ):
        load_dataset(cfg(name="csv", path=str(path), columns={"text": "body", "label": "stars"}))
    # The label column defaults to "label", which this file lacks.
    with pytest.raises(DataError, match="data.columns.label='label': no such column"):
        load_dataset(cfg(name="csv", path=str(path), columns={"text": "review"}))
    with pytest.raises(DataError, match="data.columns.text is empty"):
        load_dataset(cfg(name="csv", path=str(path), columns={"text": "", "label": "stars"}))
    with pytest.raises(DataError, match="needs data.path"):
        load_dataset(cfg(name="jsonl", columns={"text": "review", "label": "stars"}))
    with pytest.raises(DataError, match=r"label 'pos' of row 0 is not in data.label_names \['neg'"):
        load_dataset(
            cfg(
                name="csv",
                path=str(path),
                columns={"text": "review", "label": "stars"},
                label_names=["neg", "neutral"],
            )
        )


def test_integer_labels_outside_the_label_set(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"t": f"x{i}", "y": i}) + "\n" for i in range(4)))
    with pytest.raises(
        DataError, match=r"d.jsonl: label 3 of row 3 is not in data.label_names \['a', 'b', 'c'\]"
    ):
        load_dataset(
            cfg(
                name="jsonl",
                path=str(path),
                columns={"text": "t", "label": "y"},
                label_names=["a", "b", "c"],
            )
        )


def test_unknown_name():
    with pytest.raises(DataError, match="unknown data.name 'imdbb'.*rotten_tomatoes"):
        load_dataset(cfg(name="imdbb"))
    for name in ("sst2", "ag_news", "yelp_polarity", "yahoo_answers_topics", "snli", "mnli"):
        assert name in dataset_names()
    assert {"multirc", "squad_v2", "bbc_news", "csv", "jsonl", "parquet"} <= set(dataset_names())
