"""from_pretrained's sources and its errors: hub-cache layout, offline, pickles, bad files."""

import json
import shutil
import time

import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from spry_jax import models

CONFIG = dict(
    vocab_size=64,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=24,
    max_position_embeddings=32,
    num_labels=2,
)
IDS = np.array([[2, 5, 7, 9, 11, 3], [2, 8, 4, 3, 0, 0]])
MASK = (IDS != 0).astype(np.int64)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny BertForSequenceClassification saved with save_pretrained, and its logits."""
    torch.manual_seed(0)
    tm = transformers.BertForSequenceClassification(transformers.BertConfig(**CONFIG)).eval()
    d = tmp_path_factory.mktemp("bert")
    tm.save_pretrained(d)
    with torch.no_grad():
        ref = tm(torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()
    return d, tm, ref


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _logits(model):
    return np.asarray(model(IDS, MASK))


def test_hub_name_from_cache_layout(saved, tmp_path, monkeypatch):
    d, _, ref = saved
    snap = tmp_path / "hub" / "models--someorg--tiny-bert" / "snapshots" / "0123abcd"
    _copy(d, snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = models.from_pretrained("someorg/tiny-bert")
    np.testing.assert_allclose(_logits(model), ref, atol=1e-5)
    # HF_HOME/hub is the fallback location.
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert models.resolve("someorg/tiny-bert") == snap


def test_uncached_hub_name_offline_fails_fast_naming_options(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(models.HubUnavailableError) as err:
        models.from_pretrained("FacebookAI/roberta-large")
    assert time.monotonic() - start < 5
    msg = str(err.value)
    for option in ("local directory", "HF_HUB_CACHE", "minilm", "smollm2", "pretrained=False"):
        assert option in msg
    with pytest.raises(models.HubUnavailableError):
        models.load_tokenizer("roberta-large")


def test_uncached_hub_name_unreachable_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    start = time.monotonic()
    with pytest.raises(models.HubUnavailableError, match="unreachable"):
        models.from_pretrained("someorg/not-cached")
    assert time.monotonic() - start < 5


def test_pickles_refused_unless_opted_in(saved, tmp_path):
    d, tm, ref = saved
    shutil.copy(d / "config.json", tmp_path / "config.json")
    torch.save(tm.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        models.from_pretrained(tmp_path)
    np.testing.assert_allclose(
        _logits(models.from_pretrained(tmp_path, allow_pickle=True)), ref, atol=1e-5
    )


def test_sharded_and_bfloat16_checkpoints(saved, tmp_path):
    _, tm, ref = saved
    tm.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    np.testing.assert_allclose(
        _logits(models.from_pretrained(tmp_path / "sharded")), ref, atol=1e-5
    )
    tm16 = transformers.BertForSequenceClassification(tm.config).eval()
    tm16.load_state_dict(tm.state_dict())
    tm16.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    got = _logits(models.from_pretrained(tmp_path / "bf16"))  # bf16 tensors, float32 compute
    np.testing.assert_allclose(got, ref, atol=0.05)


def test_missing_files(saved, tmp_path):
    d, _, _ = saved
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.from_pretrained("./no/such/dir")
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="No weights"):
        models.from_pretrained(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.from_pretrained(empty)
    with pytest.raises(FileNotFoundError, match="no pretrained weights"):
        models.from_pretrained("tiny-bert")


def test_shape_mismatch_names_the_tensor(saved):
    d, _, _ = saved
    with pytest.raises(
        ValueError, match=r"Tensor .bert\.encoder\.layer\.0\.intermediate\.dense\..*expects"
    ):
        models.from_pretrained(d, overrides={"intermediate_size": 20})


def test_missing_tensor_is_named(saved, tmp_path):
    d = _copy(saved[0], tmp_path / "m")
    tensors = safetensors.numpy.load_file(d / "model.safetensors")
    del tensors["bert.encoder.layer.1.attention.self.key.weight"]
    safetensors.numpy.save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="encoder/layer/1/attention/self/key/kernel"):
        models.from_pretrained(d)


def test_unknown_architecture(saved, tmp_path):
    d = _copy(saved[0], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="Unknown architecture model_type='gpt2'"):
        models.from_pretrained(d)


def test_base_checkpoint_gets_a_fresh_head(tmp_path):
    """A bare BertModel save (no classifier): the body loads, the head is seeded randomly."""
    torch.manual_seed(1)
    base = transformers.BertModel(transformers.BertConfig(**CONFIG)).eval()
    base.save_pretrained(tmp_path)
    m0 = models.from_pretrained(tmp_path, num_labels=3, seed=0)
    with torch.no_grad():
        ref = base(torch.tensor(IDS), attention_mask=torch.tensor(MASK)).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(m0.encode(IDS, MASK, None)), ref, atol=1e-5)
    k0 = np.asarray(m0.classifier.kernel[...])
    assert k0.shape == (16, 3) and 0.005 < k0.std() < 0.05  # normal(0, 0.02)
    np.testing.assert_array_equal(np.asarray(m0.classifier.bias[...]), 0)
    k1 = np.asarray(models.from_pretrained(tmp_path, num_labels=3, seed=1).classifier.kernel[...])
    assert not np.allclose(k0, k1)


def test_task_and_argument_errors(saved):
    d, _, _ = saved
    with pytest.raises(ValueError, match="task='translation'"):
        models.from_pretrained(d, task="translation")
    with pytest.raises(ValueError, match="quant='fp8'"):
        models.from_pretrained(d, quant="fp8")
    with pytest.raises(ValueError, match="pooling='max'"):
        models.from_pretrained(d, pooling="max")
