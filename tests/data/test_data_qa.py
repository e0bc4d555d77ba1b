"""Extractive QA: features, n-best post-processing and SQuAD v2 metrics on a hand-written file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ml_collections import ConfigDict

import experiments
from spry_jax import resources
from spry_jax.data import (
    DataError,
    load_dataset,
    make_federated_data,
    postprocess_qa,
    prepare_qa_features,
    squad_v2_metrics,
)
from spry_jax.data.qa import exact_match, f1_score, normalize_answer

SQUAD = Path(resources.path("squad_tiny.json"))


@pytest.fixture(scope="module")
def tiny():
    return load_dataset(ConfigDict({"name": "squad_json", "path": str(SQUAD)}))


def test_squad_json_loads(tiny):
    assert tiny.task == "qa" and len(tiny) == 7
    assert tiny.ids == ["amz1", "amz2", "amz3", "cur1", "cur2", "cur3", "cur4"]
    assert tiny.labels.tolist() == [1, 1, 0, 1, 1, 1, 0]
    assert tiny.group.tolist() == ["Amazon_River"] * 3 + ["Marie_Curie"] * 4
    for ctx, ans in zip(tiny.text_pairs, tiny.answers, strict=True):
        for text, start in zip(ans["text"], ans["answer_start"], strict=True):
            assert ctx[start : start + len(text)] == text


def test_features_point_at_the_answers(tiny, minilm_tokenizer):
    feats = prepare_qa_features(
        tiny.texts, tiny.text_pairs, tiny.answers, minilm_tokenizer, max_length=48, stride=16
    )
    n = len(feats["input_ids"])
    assert feats["offsets"].shape == (n, 48, 2) and feats["start_positions"].shape == (n,)
    # The long Curie context needs several windows at 48 tokens.
    assert np.sum(feats["example_index"] == 4) >= 2
    found = set()
    for f in range(n):
        ex = int(feats["example_index"][f])
        s, e = int(feats["start_positions"][f]), int(feats["end_positions"][f])
        if s == 0:
            assert e == 0
            continue
        ctx, gold = tiny.text_pairs[ex], tiny.answers[ex]["text"][0]
        assert ctx[feats["offsets"][f, s, 0] : feats["offsets"][f, e, 1]] == gold
        found.add(ex)
    assert found == {0, 1, 3, 4, 5}, "every answerable example is in some window"
    # Non-context tokens (question, specials, padding) carry offset -1.
    assert (feats["offsets"][:, 0] == -1).all()


def _oracle_logits(feats, tiny, answer_in_window=True):
    """Logits peaking at the gold span (or at index 0 for unanswerable examples)."""
    n, length = feats["input_ids"].shape
    start = np.full((n, length), -5.0)
    end = np.full((n, length), -5.0)
    for f in range(n):
        s, e = feats["start_positions"][f], feats["end_positions"][f]
        ex = feats["example_index"][f]
        if s > 0:
            start[f, s], end[f, e] = 8.0, 8.0
            start[f, 0] = end[f, 0] = -3.0
        elif not tiny.answers[ex]["text"]:
            start[f, 0] = end[f, 0] = 6.0
    return start, end


def test_postprocess_recovers_gold_and_scores_100(tiny, minilm_tokenizer):
    feats = prepare_qa_features(
        tiny.texts, tiny.text_pairs, tiny.answers, minilm_tokenizer, max_length=48, stride=16
    )
    start, end = _oracle_logits(feats, tiny)
    preds = postprocess_qa(start, end, feats["offsets"], feats["example_index"], tiny.text_pairs)
    assert preds == {
        0: "Brazil, Peru and Colombia",
        1: "about 6,400 kilometres",
        2: "",
        3: "Warsaw",
        4: "polonium and radium",
        5: "1891",
        6: "",
    }
    refs = {tiny.ids[i]: a["text"] for i, a in enumerate(tiny.answers)}
    m = squad_v2_metrics({tiny.ids[i]: p for i, p in preds.items()}, refs)
    assert m["exact"] == 100.0 and m["f1"] == 100.0
    assert m["HasAns_total"] == 5 and m["NoAns_total"] == 2


def test_postprocess_null_threshold_and_span_rules():
    ctx = "alpha beta gamma delta"
    # Tokens: 0 = null/CLS, 1..4 = the four words.
    offsets = np.array([[[-1, -1], [0, 5], [6, 10], [11, 16], [17, 22]]])
    start = np.array([[1.0, 0.0, 3.0, 0.0, 0.0]])
    end = np.array([[1.0, 4.0, 0.0, 0.0, 2.5]])  # best end (1) precedes best start (2): invalid
    preds = postprocess_qa(start, end, offsets, np.array([0]), [ctx])
    assert preds == {0: "beta gamma delta"}  # start 2 (3.0) + end 4 (2.5) = 5.5 > null 2.0
    assert postprocess_qa(start, end, offsets, np.array([0]), [ctx], max_answer_length=2) == {
        0: "alpha"  # spans of <= 2 tokens: best is start 1 + end 1 = 4.0
    }
    assert postprocess_qa(
        start, end, offsets, np.array([0]), [ctx], null_score_diff_threshold=-4.0
    ) == {0: ""}  # null 2.0 - best 5.5 = -3.5 > -4.0


def test_metrics_on_known_examples_by_hand():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert exact_match("the cat sat", "Cat sat.") == 1.0
    # pred [cat, sat] vs gold [cat, sat, on, mat]: P = 1, R = 1/2, F1 = 2/3.
    assert f1_score("the cat sat", "cat sat on the mat") == pytest.approx(2 / 3)
    # pred [red, cat] vs gold [cat, sat, red]: 2 common, P = 1, R = 2/3, F1 = 0.8.
    assert f1_score("a red cat", "cat sat red") == pytest.approx(0.8)
    assert f1_score("", "") == 1.0 and f1_score("x", "") == 0.0
    m = squad_v2_metrics(
        {"q1": "the cat sat", "q2": "", "q3": "Paris", "q4": "blue sky"},
        {
            "q1": ["cat sat on the mat", "a cat sat"],  # max over golds: EM 1 (with "a cat sat")
            "q2": [],  # unanswerable, predicted empty: EM 1, F1 1
            "q3": ["London"],  # EM 0, F1 0
            "q4": [],  # unanswerable, answered: EM 0, F1 0
        },
    )
    assert m["exact"] == pytest.approx(100 * 2 / 4)
    assert m["f1"] == pytest.approx(100 * 2 / 4)
    assert m["HasAns_exact"] == pytest.approx(50.0) and m["NoAns_exact"] == pytest.approx(50.0)
    m2 = squad_v2_metrics(
        {"a": "the cat sat", "b": "red cat"}, {"a": ["cat sat on mat"], "b": ["cat sat red"]}
    )
    assert m2["f1"] == pytest.approx(100 * (2 / 3 + 0.8) / 2)
    assert m2["exact"] == 0.0
    with pytest.raises(DataError, match="no prediction for 1 example"):
        squad_v2_metrics({}, {"a": ["x"]})


def test_federated_qa_splits_by_article(tiny, minilm_tokenizer, tmp_cache):
    fd = make_federated_data(
        ConfigDict(
            {
                "name": "squad_json",
                "path": str(SQUAD),
                "partition": "natural",
                "max_length": 48,
                "qa_stride": 16,
            }
        ),
        num_clients=2,
        tokenizer=minilm_tokenizer,
        seed=0,
    )
    assert fd.task == "qa"
    titles = []
    for c in range(2):
        tr, te = fd.client_examples[c]
        ex = np.r_[tr, te]
        titles.append(set(tiny.group[ex].tolist()))
        assert len(titles[-1]) == 1, "natural QA partition: one article per client"
        # Feature rows belong exactly to the client's train examples.
        assert set(fd.train[c]["example_index"].tolist()) == set(tr.tolist())
        assert set(fd.test[c]["example_index"].tolist()) == set(te.tolist())
        for k in ("start_positions", "end_positions", "offsets", "labels"):
            assert len(fd.train[c][k]) == fd.num_examples(c)
    assert titles[0] != titles[1]


def _synthetic_squad(path: Path, num_titles: int = 477, seed: int = 0) -> int:
    """Writes a SQuAD v2-format file with ``num_titles`` articles (SQuAD v2 has 477 titles),
    1-2 paragraphs each, answerable and unanswerable questions; returns the question count."""
    rng = np.random.default_rng(seed)
    data, n = [], 0
    for t in range(num_titles):
        paragraphs = []
        for p in range(int(rng.integers(1, 3))):
            context = f"Article {t} paragraph {p} is about topic{t} and the answer is word{t}."
            qas = []
            for q in range(int(rng.integers(1, 6))):
                impossible = bool(rng.random() < 0.3)
                answer = f"word{t}"
                qas.append(
                    {
                        "id": f"q{t}_{p}_{q}",
                        "question": f"What is the answer {q} of article {t}?",
                        "is_impossible": impossible,
                        "answers": []
                        if impossible
                        else [{"text": answer, "answer_start": context.index(answer)}],
                    }
                )
                n += 1
            paragraphs.append({"context": context, "qas": qas})
        data.append({"title": f"Article_{t:03d}", "paragraphs": paragraphs})
    path.write_text(json.dumps({"version": "v2.0", "data": data}))
    return n


def test_paper_squad_setting_builds_500_clients_over_477_titles(
    tmp_path, minilm_tokenizer, tmp_cache
):
    """experiments/squad_v2.py's data settings (500 clients, partition by title) on a
    synthetic 477-title SQuAD v2 file: every question in exactly one client, equal sizes."""
    c = _load_experiment("squad_v2").get_config()
    assert c.num_clients == 500 and c.data.partition == "group_dirichlet"
    path = tmp_path / "squad477.json"
    n = _synthetic_squad(path)
    cfg = ConfigDict(c.data.to_dict())
    cfg.name, cfg.path = "squad_json", str(path)
    fd = make_federated_data(cfg, num_clients=c.num_clients, tokenizer=minilm_tokenizer, seed=0)
    assert len(set(fd.dataset.group.tolist())) == 477
    assert len(fd.train) == len(fd.test) == 500
    examples = [np.r_[tr, te] for tr, te in fd.client_examples]
    assert np.array_equal(np.sort(np.concatenate(examples)), np.arange(n))
    assert {len(e) for e in examples} == ({n // 500} | ({n // 500 + 1} if n % 500 else set()))
    for c_idx, (tr, _) in enumerate(fd.client_examples):
        assert set(fd.train[c_idx]["example_index"].tolist()) == set(tr.tolist())
    again = make_federated_data(cfg, num_clients=c.num_clients, tokenizer=minilm_tokenizer, seed=0)
    assert all(
        np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        for a, b in zip(fd.client_examples, again.client_examples, strict=True)
    )


def _load_experiment(name: str):
    return experiments.load(name)
