"""Labels are checked, not guessed; empty files and data-independent mistakes fail early."""

import json

import pytest

from spry_jax.data import DataError, load_dataset, make_federated_data


def _jsonl(path, labels):
    path.write_text(
        "".join(json.dumps({"text": f"t{i}", "label": y}) + "\n" for i, y in enumerate(labels))
    )
    return str(path)


def test_a_stray_integer_label_is_refused_naming_its_row(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [0, 1, 0, 1, 7, 0])
    with pytest.raises(
        DataError,
        match=r"d.jsonl: integer labels must be 0..K-1; found \[0, 1, 7\]"
        r" \(missing \[2, 3, 4, 5, 6\]\), label 7 first at row 4",
    ):
        load_dataset({"name": "jsonl", "path": path})
    # With the label set given, the same row is named against it.
    with pytest.raises(
        DataError, match=r"label 7 of row 4 is not in data.label_names \['a', 'b'\]"
    ):
        load_dataset({"name": "jsonl", "path": path, "label_names": ("a", "b")})


def test_null_and_nan_labels_are_refused_naming_the_row(tmp_path):
    with pytest.raises(DataError, match=r"d.jsonl: row 2 has no label \(None\)"):
        load_dataset({"name": "jsonl", "path": _jsonl(tmp_path / "d.jsonl", [0, 1, None, 1])})
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\na,0\nb,1\nc,\nd,NaN\n")  # both read back as missing
    with pytest.raises(DataError, match=r"d.csv: row 2 has no label"):
        load_dataset({"name": "csv", "path": str(csv)})
    named = tmp_path / "n.csv"
    named.write_text("text,label\na,pos\nb,\n")
    with pytest.raises(DataError, match=r"n.csv: row 1 has no label"):
        load_dataset({"name": "csv", "path": str(named), "label_names": ("neg", "pos")})


def test_integer_labels_read_as_floats_stay_integers(tmp_path):
    csv = tmp_path / "f.csv"
    csv.write_text("text,label,extra\na,0,\nb,1,x\nc,1,\n")
    ds = load_dataset({"name": "csv", "path": str(csv)})
    assert ds.label_names == ("0", "1") and ds.labels.tolist() == [0, 1, 1]


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("csv", "", "is empty"),
        ("jsonl", "", "is empty"),
        ("jsonl", "\n\n", "is empty"),
        ("csv", "text,label\n", "has a header but no rows"),
    ],
)
def test_an_empty_file_is_refused_naming_it(tmp_path, name, content, message):
    path = tmp_path / f"e.{name}"
    path.write_text(content)
    with pytest.raises(DataError, match=f"data.path '{path}' {message}"):
        load_dataset({"name": name, "path": str(path)})


def test_a_split_column_value_other_than_train_or_test_is_refused(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("text,label,split\na,0,train\nb,1,test\nc,1,dev\n")
    with pytest.raises(DataError, match=r"s.csv: row 2 has split='dev'"):
        load_dataset({"name": "csv", "path": str(path)})


def test_data_independent_checks_run_before_anything_is_read(tmp_path):
    # The file does not exist and there is no tokenizer: the config error must come first.
    for cfg, field in (
        ({"alpha": 0.0}, "data.alpha"),
        ({"alpha": float("nan")}, "data.alpha"),
        ({"test_fraction": 1.0}, "data.test_fraction"),
        ({"heldout_fraction": -0.1}, "data.heldout_fraction"),
        ({"partition": "dirichlett"}, "data.partition"),
    ):
        with pytest.raises(DataError, match=field):
            make_federated_data(
                {"name": "csv", "path": str(tmp_path / "absent.csv"), **cfg},
                num_clients=2,
                tokenizer=None,
                seed=0,
            )
    with pytest.raises(DataError, match=r"data.colums is not a data field; did you mean"):
        load_dataset({"name": "csv", "colums": {"text": "x"}})
