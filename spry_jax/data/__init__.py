"""Data: load -> tokenize (cached) -> partition over clients -> pack fixed-shape round arrays."""

from spry_jax.data.errors import DataError
from spry_jax.data.federated import FederatedData, make_federated_data
from spry_jax.data.packing import pack_clients, pack_eval
from spry_jax.data.partition import (
    dirichlet_partition,
    group_dirichlet_partition,
    iid_partition,
    label_entropy,
    natural_partition,
    train_test_split,
)
from spry_jax.data.qa import postprocess_qa, prepare_qa_features, squad_v2_metrics
from spry_jax.data.registry import TextDataset, dataset_names, load_dataset
from spry_jax.data.synthetic import make_synthetic

__all__ = [
    "DataError",
    "FederatedData",
    "TextDataset",
    "dataset_names",
    "dirichlet_partition",
    "group_dirichlet_partition",
    "iid_partition",
    "label_entropy",
    "load_dataset",
    "make_federated_data",
    "make_synthetic",
    "natural_partition",
    "pack_clients",
    "pack_eval",
    "postprocess_qa",
    "prepare_qa_features",
    "squad_v2_metrics",
    "train_test_split",
]
