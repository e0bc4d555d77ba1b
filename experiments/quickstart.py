"""Quickstart: Spry on the offline Rotten Tomatoes critic snippets with MiniLM-L6 + LoRA.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
      python -m spry_jax.main --config=experiments/quickstart.py --workdir=runs/quickstart

100 clients (label-Dirichlet alpha = 1, 102 train / 26 test snippets each), 10 per round, 40
rounds; MiniLM-L6 (all-MiniLM-L6-v2 weights from the offline asset) with mean pooling, LoRA
r = 1 on the last layer's query/value (two units of 768 weights) and a linear head shared by
every client. Forward gradients with K = 16 tangents per step; FedAvg on the server. After the
last round the global model is scored on all 100 clients' test splits
(``eval/all_clients_accuracy`` in summary.json, 2,600 snippets).

Why these settings (docs/quickstart_results.md has every run and the reasoning):

* A forward gradient's noise grows with the number of perturbed weights and falls with K. The
  cost of a tangent is the forward pass from the lowest adapted layer up, so LoRA on the last
  layer makes each tangent cost ~0.12 of a forward (XLA cost analysis of one local step: 8.6
  GFLOP at K = 16 and 3.3 at K = 1, against 5.7 at K = 1 with LoRA on every layer), and K = 16
  becomes affordable.
* With AdamW every perturbed weight moves by ~lr per step whatever its gradient, so LoRA weights
  with little signal random-walk: at lr 1e-2 and alpha = 1 the B matrices reached norm ~4 in 20
  rounds and the model drifted to predicting one class. ``lora_alpha = 1/16`` scales the
  LoRA branch (and so that drift) down 16x.

Measured (seed 0, docs/quickstart_results.md): see the table there and in the README; the
majority class scores 0.579 on the same 2,600 snippets.
"""

from spry_jax.config import default_config


def get_config():
    c = default_config()
    c.method = "spry"
    c.rounds = 40
    c.num_clients = 100
    c.clients_per_round = 10
    c.eval_every = 0  # the per-round generalized figure is the global model on 10 clients only
    c.checkpoint_every = 10
    c.data.name = "rotten_tomatoes"
    c.data.partition = "dirichlet"
    c.data.alpha = 1.0
    c.data.max_length = 32
    c.model.name = "minilm"
    c.model.pooling = "mean"
    c.peft.lora_rank = 1
    c.peft.lora_alpha = 0.0625
    c.peft.target_modules = (r"encoder/layer/5/attention/self/(query|value)",)
    c.split.tensors_per_unit = 2
    c.split.classifier_share = True
    c.fwd.num_tangents = 16
    c.client.lr = 2e-2
    c.client.batch_size = 4
    c.client.max_steps = 16
    c.server.optimizer = "fedavg"
    c.round.backend = "vmap"
    return c
