"""Image datasets as uint8 arrays: Fashion-MNIST idx files or a user's `.npz`."""

from tmpq_jax.data.loaders import (
    APT_PACKAGE,
    DEFAULT_FMNIST_DIR,
    Dataset,
    load_dataset,
    load_fmnist,
    load_npz,
    to_model_range,
)

__all__ = [
    "APT_PACKAGE",
    "DEFAULT_FMNIST_DIR",
    "Dataset",
    "load_dataset",
    "load_fmnist",
    "load_npz",
    "to_model_range",
]
