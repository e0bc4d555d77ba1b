"""Smoke test: a tiny random-init BERT on synthetic data, two rounds of Spry.

    python -m spry_jax.main --config=experiments/smoke.py --workdir=/tmp/spry_smoke

Runs in well under a minute on one CPU core. Expected: finite train/loss, accuracies near
chance (two rounds of a random model), and config.json, metrics.jsonl, summary.json and
checkpoints/ in the workdir.
"""

from spry_jax.config import default_config


def get_config():
    c = default_config()
    c.method = "spry"
    c.rounds = 2
    c.num_clients = 8
    c.clients_per_round = 4
    c.eval_every = 1
    c.checkpoint_every = 1
    c.data.name = "synthetic"
    c.data.partition = "dirichlet"
    c.data.alpha = 1.0
    c.data.num_examples = 320
    c.data.vocab_size = 128
    c.data.num_labels = 2
    c.data.seq_len = 16
    c.data.max_length = 16
    c.model.name = "tiny-bert"
    c.model.pretrained = False
    c.peft.lora_rank = 2
    c.client.batch_size = 8
    c.client.lr = 1e-3
    c.eval_batch_size = 16
    return c
