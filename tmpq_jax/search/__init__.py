"""The joint search of TMPQ-DM (arXiv 2404.09532): timesteps and layer-wise bits,
a population at a time, each generation one compiled program on the device."""

from tmpq_jax.search.config import SearchConfig, SearchRunConfig
from tmpq_jax.search.engine import Archive, Engine, SearchState
from tmpq_jax.search.run import run_generations, search
from tmpq_jax.search.setup import Setup, build_setup, prepare, prepare_model
from tmpq_jax.search.space import GenomeSpace

__all__ = [
    "Archive",
    "Engine",
    "GenomeSpace",
    "SearchConfig",
    "SearchRunConfig",
    "SearchState",
    "Setup",
    "build_setup",
    "prepare",
    "prepare_model",
    "run_generations",
    "search",
]
