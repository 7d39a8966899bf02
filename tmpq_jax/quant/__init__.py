"""Quantization supernet (TMPQ-DM, arXiv 2404.09532): per-layer traced bit-widths
applied to any Flax model (Linen or NNX) through AQT, the layer registry and the cost model."""

from tmpq_jax.quant import intercept
from tmpq_jax.quant.bias_correction import bias_corrections
from tmpq_jax.quant.calibration import calibrate, calibration_set
from tmpq_jax.quant.calibration_io import load_calibration, save_calibration
from tmpq_jax.quant.cost import (
    bitops_per_step,
    layer_bitops,
    model_size_bits,
    total_bitops,
    uniform_bitops,
    within_budget,
)
from tmpq_jax.quant.coverage import check_coverage, format_registry, print_registry
from tmpq_jax.quant.registry import (
    FloatOp,
    LayerInfo,
    LayerRegistry,
    build_registry,
    unet_registry,
)
from tmpq_jax.quant.solver import solve
from tmpq_jax.quant.supernet import (
    DEFAULT_CANDIDATES,
    QParams,
    QuantBits,
    check_bits,
    check_candidates,
    make_handler,
    quantized_apply,
)

__all__ = [
    "DEFAULT_CANDIDATES",
    "FloatOp",
    "LayerInfo",
    "LayerRegistry",
    "QParams",
    "QuantBits",
    "bias_corrections",
    "bitops_per_step",
    "build_registry",
    "calibrate",
    "calibration_set",
    "check_bits",
    "check_candidates",
    "check_coverage",
    "format_registry",
    "intercept",
    "layer_bitops",
    "load_calibration",
    "make_handler",
    "model_size_bits",
    "print_registry",
    "quantized_apply",
    "save_calibration",
    "solve",
    "total_bitops",
    "uniform_bitops",
    "unet_registry",
    "within_budget",
]
