"""tmpq_jax: joint timestep and mixed-precision search for diffusion models (TMPQ-DM)."""

__version__ = "0.1.0"
