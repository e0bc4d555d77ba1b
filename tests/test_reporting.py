"""The table a run prints at its end (``reporting.final_table``)."""

import json

from spry_jax import reporting


def test_final_table_lists_the_run_the_majority_class_and_labelled_references(tmp_path):
    ref = tmp_path / "ref.json"
    rows = [{"label": "head only", "accuracy": 0.7123, "ci95": 0.0042, "source": "study X"}]
    ref.write_text(json.dumps(rows))
    summary = {
        "method": "spry",
        "rounds": 20,
        "final": {
            "eval/all_clients_accuracy": 0.7358,
            "eval/all_clients_majority_accuracy": 0.5792,
            "eval/all_clients_examples": 2600.0,
        },
    }
    lines = reporting.final_table(summary, str(ref)).splitlines()
    assert lines[0] == "Accuracy on all clients' test splits (2600 examples):"
    assert "this run (spry, 20 rounds)" in lines[1] and "0.736" in lines[1]
    assert "majority class" in lines[2] and "0.579" in lines[2]
    assert "head only" in lines[3] and "0.712 +- 0.004" in lines[3] and "[study X]" in lines[3]
    assert reporting.final_table({"final": {}}) == ""
