"""Sample-quality metrics in the feature space of our own Fashion-MNIST classifier.

No Inception weights exist offline (DESIGN.md section 4): FID/KID/IS here are
"FID (FMNIST classifier features)" etc., never comparable to published numbers.
"""

from tmpq_jax.metrics.classifier import Classifier, ClassifierConfig
from tmpq_jax.metrics.feature_net import (
    DEFAULT_FEATURE_NET,
    Extracted,
    FeatureNet,
    check_images,
    load_feature_net,
)
from tmpq_jax.metrics.fid import (
    check_features,
    class_histogram,
    fid,
    fid_from_features,
    fid_from_stats,
    gaussian_stats,
    inception_score,
    kid,
    kid_core,
    sqrtm_psd,
)
from tmpq_jax.metrics.reference import (
    REF_STATS_FILE,
    compute_reference_stats,
    fid_floor,
    load_reference_stats,
    save_reference_stats,
)
from tmpq_jax.metrics.train_classifier import ClassifierTrainConfig, train_classifier

__all__ = [
    "DEFAULT_FEATURE_NET",
    "REF_STATS_FILE",
    "Classifier",
    "ClassifierConfig",
    "ClassifierTrainConfig",
    "Extracted",
    "FeatureNet",
    "check_features",
    "check_images",
    "class_histogram",
    "compute_reference_stats",
    "fid",
    "fid_floor",
    "fid_from_features",
    "fid_from_stats",
    "gaussian_stats",
    "inception_score",
    "kid",
    "kid_core",
    "load_feature_net",
    "load_reference_stats",
    "save_reference_stats",
    "sqrtm_psd",
    "train_classifier",
]
