"""Image datasets as uint8 arrays: Fashion-MNIST idx files or a user's `.npz`."""

from tmpq_jax.data.loaders import (
    APT_PACKAGE,
    DEFAULT_FMNIST_DIR,
    FMNIST_TRAIN_FINGERPRINT,
    Dataset,
    Splits,
    data_fingerprint,
    holdout,
    load_dataset,
    load_fmnist,
    load_npz,
    load_splits,
    model_data_fingerprint,
    to_model_range,
)

__all__ = [
    "APT_PACKAGE",
    "DEFAULT_FMNIST_DIR",
    "FMNIST_TRAIN_FINGERPRINT",
    "Dataset",
    "Splits",
    "data_fingerprint",
    "holdout",
    "load_dataset",
    "load_fmnist",
    "load_npz",
    "load_splits",
    "model_data_fingerprint",
    "to_model_range",
]
