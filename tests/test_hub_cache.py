"""The hub path end to end, offline: ``data.name=sst2`` and ``model.name=<hub id>`` found by
``datasets``' and ``huggingface_hub``'s own cache lookup under ``$HF_HOME``, no private path.

The test writes, in a temporary ``HF_HOME``:

* ``hub/models--spry-test--tiny-bert-sst2/``: a tiny random BERT classifier and its WordPiece
  tokenizer saved with transformers' ``save_pretrained``, laid out as the hub cache lays out a
  download (``blobs/<sha256>``, ``snapshots/<commit>/<file>`` symlinks into the blobs,
  ``refs/main`` holding the commit);
* ``datasets/nyu-mll___glue/sst2/0.0.0/<hash>/``: GLUE SST-2 as ``datasets`` caches a download
  of the registry's hub dataset (``nyu-mll/glue``, config ``sst2``): ``glue-train.arrow``,
  ``glue-validation.arrow`` (Arrow streams written by ``datasets``' ``ArrowWriter``) and
  ``dataset_info.json``, with SST-2's features (``sentence``, ``label`` as a ClassLabel
  negative/positive, ``idx``). Offline, ``datasets.load_dataset("nyu-mll/glue", "sst2")`` falls
  back to exactly this cache.

Then ``python -m spry_jax.main`` runs with nothing but those names.
"""

import hashlib
import json
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
import transformers
from datasets.arrow_writer import ArrowWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = "spry-test/tiny-bert-sst2"
COMMIT = "5b1d3c0ffee0ddba11c0ffee5b1d3c0ffee0ddba"
GOOD = ["good", "great", "fine", "lovely", "moving", "warm"]
BAD = ["bad", "dull", "awful", "boring", "flat", "cold"]
FILLER = ["the", "film", "was", "a", "story", "and", "acting", "very", "quite", "plot"]


def _sentences(n: int, rng: np.random.Generator) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    for _ in range(n):
        y = int(rng.integers(2))
        words = list(rng.choice(FILLER, size=4)) + [str(rng.choice(GOOD if y else BAD))]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(y)
    return texts, labels


def _write_model_repo(hub: str, tmp) -> str:
    """A tiny BERT + tokenizer in the hub cache layout; returns the snapshot directory."""
    import torch

    src = tmp / "saved"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER, *GOOD, *BAD]
    (tmp / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(tmp / "vocab.txt")).save_pretrained(src)
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=2,
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(src)
    repo = os.path.join(hub, "models--" + REPO.replace("/", "--"))
    snap = os.path.join(repo, "snapshots", COMMIT)
    os.makedirs(os.path.join(repo, "blobs"))
    os.makedirs(snap)
    for name in sorted(os.listdir(src)):
        data = (src / name).read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        with open(os.path.join(repo, "blobs", blob), "wb") as f:
            f.write(data)
        os.symlink(os.path.join("..", "..", "blobs", blob), os.path.join(snap, name))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(COMMIT)
    return snap


def _write_sst2_cache(datasets_cache: str) -> dict[str, tuple[list[str], list[int]]]:
    """GLUE SST-2 in the datasets cache layout; returns the rows written per split."""
    features = datasets.Features(
        {
            "sentence": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["negative", "positive"]),
            "idx": datasets.Value("int32"),
        }
    )
    d = os.path.join(datasets_cache, "nyu-mll___glue", "sst2", "0.0.0", "0123456789abcdef")
    os.makedirs(d)
    rng = np.random.default_rng(0)
    splits = datasets.SplitDict(dataset_name="glue")
    rows = {}
    for split, n in (("train", 160), ("validation", 40)):
        texts, labels = _sentences(n, rng)
        rows[split] = (texts, labels)
        with ArrowWriter(features=features, path=os.path.join(d, f"glue-{split}.arrow")) as w:
            w.write_batch({"sentence": texts, "label": labels, "idx": list(range(n))})
            num, nbytes = w.finalize()
        splits.add(
            datasets.SplitInfo(name=split, num_bytes=nbytes, num_examples=num, dataset_name="glue")
        )
    info = datasets.DatasetInfo(
        features=features, config_name="sst2", dataset_name="glue", splits=splits
    )
    info.write_to_directory(d)
    return rows


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    home = tmp / "home"
    snap = _write_model_repo(str(home / "hub"), tmp)
    rows = _write_sst2_cache(str(home / "datasets"))
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_CACHE", "HF_DATASETS_CACHE", "HUGGINGFACE_HUB_CACHE", "XLA_FLAGS")
    }
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env, snap, rows


def _python(env, code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_names_resolve_through_the_libraries_own_cache_lookup(hf_home):
    env, snap, rows = hf_home
    got = json.loads(
        _python(
            env,
            "import json\n"
            "from spry_jax import models\n"
            "from spry_jax.data import load_dataset\n"
            "ds = load_dataset({'name': 'sst2'})\n"
            f"print(json.dumps({{'snap': str(models.resolve({REPO!r})),\n"
            "  'texts': list(ds.texts), 'labels': ds.labels.tolist(),\n"
            "  'label_names': list(ds.label_names), 'heldout': ds.heldout.tolist()}))\n",
        ).splitlines()[-1]
    )
    assert got["snap"] == snap
    # The registry pools train and the labelled validation split (GLUE's test is unlabelled),
    # marking validation as the official held-out split.
    (tt, tl), (vt, vl) = rows["train"], rows["validation"]
    assert got["texts"] == tt + vt
    assert got["labels"] == tl + vl
    assert got["label_names"] == ["negative", "positive"]
    assert got["heldout"] == [False] * len(tt) + [True] * len(vt)


def test_sst2_and_a_hub_model_id_run_end_to_end_offline(hf_home, tmp_path):
    env, _, rows = hf_home
    cmd = [
        sys.executable,
        "-m",
        "spry_jax.main",
        "--config=experiments/smoke.py",
        "--config.data.name=sst2",
        f"--config.model.name={REPO}",
        "--config.model.pretrained=True",
        "--config.round.backend=vmap",
        "--config.log_memory=False",
        f"--workdir={tmp_path}",
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "summary.json") as f:
        final = json.load(f)["final"]
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    assert config["data"]["name"] == "sst2" and config["model"]["name"] == REPO
    assert not config["data"].get("path")
    assert np.isfinite(final["eval/all_clients_loss"])
    # Every client's 80/20 split of the 200 written sentences: the test splits hold 20 %.
    n = sum(len(t) for t, _ in rows.values())
    assert 0.1 * n < final["eval/all_clients_examples"] < 0.3 * n
