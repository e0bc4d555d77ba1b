"""Extractive question answering in the SQuAD v2 shape.

* :func:`prepare_qa_features` -- question/context pairs to fixed-length features with a sliding
  window over long contexts, start/end token positions for training (index 0 = no answer in
  this window), and the character offsets post-processing needs.
* :func:`postprocess_qa` -- n-best span search over each example's features with the SQuAD v2
  null-answer rule.
* :func:`squad_v2_metrics` -- exact match and F1 as defined by the official SQuAD v2
  evaluation (answer normalisation, max over gold answers, empty gold = unanswerable).
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from spry_jax.data.errors import DataError
from spry_jax.data.tokenize import as_hf_tokenizer, pad_token_id


def prepare_qa_features(
    questions: Sequence[str],
    contexts: Sequence[str],
    answers: Sequence[Mapping[str, Sequence]],
    tokenizer: Any,
    *,
    max_length: int,
    stride: int,
) -> dict[str, np.ndarray]:
    """Tokenizes QA examples into features.

    Args:
      questions, contexts: per example.
      answers: per example ``{"text": [...], "answer_start": [...]}`` (empty = unanswerable);
        the first answer is the training target.
      tokenizer: a transformers fast tokenizer (or ``tokenizers.Tokenizer``): offsets needed.
      max_length: tokens per feature (``data.max_length``).
      stride: overlap (tokens) between consecutive windows of a long context
        (``data.qa_stride``).

    Returns:
      ``input_ids``, ``attention_mask`` int32 [F, L]; ``start_positions``, ``end_positions``
      int32 [F] (0 when the answer is not inside this window or there is none);
      ``offsets`` int32 [F, L, 2] (character span in the context, -1 for non-context tokens);
      ``example_index`` int32 [F]; ``labels`` int32 [F] (1 = the window contains the answer).
    """
    if not len(questions) == len(contexts) == len(answers):
        raise DataError("questions, contexts and answers must have the same length")
    if stride >= max_length:
        raise DataError(f"data.qa_stride={stride} must be < data.max_length={max_length}")
    tok = as_hf_tokenizer(tokenizer)
    if not getattr(tok, "is_fast", False):
        raise DataError("QA features need a fast tokenizer (character offsets)")
    # Left padding/truncation sides would put the question at the end; this layout assumes right.
    try:
        enc = tok(
            [q.lstrip() for q in questions],
            list(contexts),
            truncation="only_second",
            max_length=max_length,
            stride=stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            padding=False,
        )
    except Exception as e:  # tokenizers raises a bare Exception when a question is too long
        raise DataError(
            f"QA tokenisation failed ({e}); a question may be longer than data.max_length="
            f"{max_length} - data.qa_stride; raise max_length"
        ) from e
    n_feat = len(enc["input_ids"])
    ids = np.full((n_feat, max_length), pad_token_id(tok), dtype=np.int32)
    mask = np.zeros((n_feat, max_length), dtype=np.int32)
    offsets = np.full((n_feat, max_length, 2), -1, dtype=np.int32)
    start = np.zeros(n_feat, dtype=np.int32)
    end = np.zeros(n_feat, dtype=np.int32)
    example_index = np.asarray(enc["overflow_to_sample_mapping"], dtype=np.int32)
    for f in range(n_feat):
        row = enc["input_ids"][f]
        ids[f, : len(row)] = row
        mask[f, : len(row)] = 1
        seq = enc.sequence_ids(f)
        ctx = [i for i, s in enumerate(seq) if s == 1]
        for i in ctx:
            offsets[f, i] = enc["offset_mapping"][f][i]
        ans = answers[example_index[f]]
        if not ans["text"] or not ctx:
            continue
        a_start = int(ans["answer_start"][0])
        a_end = a_start + len(ans["text"][0])
        first, last = ctx[0], ctx[-1]
        if offsets[f, first, 0] > a_start or offsets[f, last, 1] < a_end:
            continue  # the answer is not (fully) inside this window
        s = first
        while s <= last and offsets[f, s, 1] <= a_start:
            s += 1
        e = last
        while e >= first and offsets[f, e, 0] >= a_end:
            e -= 1
        start[f], end[f] = s, e
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "start_positions": start,
        "end_positions": end,
        "offsets": offsets,
        "example_index": example_index,
        "labels": (end > 0).astype(np.int32),
    }


def postprocess_qa(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    offsets: np.ndarray,
    example_index: np.ndarray,
    contexts: Sequence[str] | Mapping[int, str],
    *,
    n_best: int = 20,
    max_answer_length: int = 30,
    null_score_diff_threshold: float = 0.0,
    version_2: bool = True,
) -> dict[int, str]:
    """Turns per-feature start/end logits into one answer string per example.

    For each example, over all its features: the best span among the ``n_best`` top start and
    end logits (spans inside the context, ``start <= end``, at most ``max_answer_length``
    tokens), scored ``start_logit + end_logit``. SQuAD v2: the null score is the minimum over
    the example's features of ``start_logit[0] + end_logit[0]``; the prediction is the empty
    string if ``null - best > null_score_diff_threshold`` or no valid span exists.

    Returns:
      ``{example index: predicted text}`` for every example that has a feature.
    """
    start_logits = np.asarray(start_logits, dtype=np.float64)
    end_logits = np.asarray(end_logits, dtype=np.float64)
    by_example: dict[int, list[int]] = collections.defaultdict(list)
    for f, ex in enumerate(np.asarray(example_index)):
        by_example[int(ex)].append(f)
    preds: dict[int, str] = {}
    for ex, feats in by_example.items():
        context = contexts[ex]
        null = min(start_logits[f, 0] + end_logits[f, 0] for f in feats)
        best_score, best_text = -np.inf, ""
        for f in feats:
            off = offsets[f]
            starts = np.argsort(-start_logits[f], kind="stable")[:n_best]
            ends = np.argsort(-end_logits[f], kind="stable")[:n_best]
            for s in starts:
                if off[s, 0] < 0:
                    continue
                for e in ends:
                    if off[e, 0] < 0 or e < s or e - s + 1 > max_answer_length:
                        continue
                    score = start_logits[f, s] + end_logits[f, e]
                    if score > best_score:
                        best_score = score
                        best_text = context[off[s, 0] : off[e, 1]]
        if version_2 and (best_score == -np.inf or null - best_score > null_score_diff_threshold):
            preds[ex] = ""
        else:
            preds[ex] = best_text
    return preds


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 if the normalised strings are equal."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalised strings (SQuAD v2: empty vs empty = 1)."""
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_v2_metrics(
    predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]]
) -> dict[str, float]:
    """Exact match and F1 (percent) over ``references`` (id -> gold answer texts).

    An example whose gold answers normalise to nothing is unanswerable: its only gold answer
    is "". Every reference id must have a prediction.

    Returns:
      ``exact``, ``f1``, ``total`` and, where present, ``HasAns_*`` / ``NoAns_*`` splits.
    """
    missing = [k for k in references if k not in predictions]
    if missing:
        raise DataError(f"no prediction for {len(missing)} example(s), e.g. {missing[:3]}")
    rows = []
    for qid, golds in references.items():
        golds = [g for g in golds if normalize_answer(g)] or [""]
        pred = predictions[qid]
        em = max(exact_match(pred, g) for g in golds)
        f1 = max(f1_score(pred, g) for g in golds)
        rows.append((golds != [""], em, f1))
    out: dict[str, float] = {}
    for tag, sel in (("", rows), ("HasAns_", [r for r in rows if r[0]])):
        if sel:
            out[f"{tag}exact"] = 100.0 * np.mean([r[1] for r in sel])
            out[f"{tag}f1"] = 100.0 * np.mean([r[2] for r in sel])
            out[f"{tag}total"] = float(len(sel))
    no = [r for r in rows if not r[0]]
    if no:
        out["NoAns_exact"] = 100.0 * np.mean([r[1] for r in no])
        out["NoAns_f1"] = 100.0 * np.mean([r[2] for r in no])
        out["NoAns_total"] = float(len(no))
    return out
