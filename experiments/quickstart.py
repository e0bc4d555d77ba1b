"""Quickstart: Spry on the offline Rotten Tomatoes critic snippets with MiniLM-L6 + LoRA.

    python -m spry_jax.main --config=experiments/quickstart.py --workdir=runs/quickstart

100 clients (label-Dirichlet alpha = 1), 10 per round; MiniLM-L6 (all-MiniLM-L6-v2 weights from
the offline asset) with mean pooling, LoRA r = 2 on query/value plus the head; forward gradients,
K = 1, each client perturbing only its units. Sequence length 48 and a subsample keep it CPU-sized.
"""

from spry_jax.config import default_config


def get_config():
    c = default_config()
    c.method = "spry"
    c.rounds = 60
    c.num_clients = 100
    c.clients_per_round = 10
    c.eval_every = 10
    c.checkpoint_every = 10
    c.data.name = "rotten_tomatoes"
    c.data.partition = "dirichlet"
    c.data.alpha = 1.0
    c.data.max_length = 48
    c.model.name = "minilm"
    c.model.pooling = "mean"
    c.peft.lora_rank = 2
    c.peft.lora_alpha = 2.0
    c.split.classifier_share = True
    c.fwd.num_tangents = 1
    c.client.lr = 3e-3
    c.client.batch_size = 16
    c.client.max_steps = 8
    c.server.optimizer = "fedavg"
    c.round.backend = "vmap"
    return c
