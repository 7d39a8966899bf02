"""How a genome's time genes become samples, per kind of model.

* `DDIM`: a noise-prediction model over integer timesteps (`samplers.ddim_sample`).
* `Flow`: a velocity model; gene k is the time (k + 1) / R (`flow.gene_times`),
  integrated by Euler or Heun (`flow.SOLVERS`) from t = 1 to 0. A class-
  conditional model samples the labels it is given (class-balanced: `labels_for`)
  and, at a guidance scale other than 1, runs classifier-free guidance: the
  conditional and the null batch in one forward (`guidance.guided_velocity`), so
  every step costs `evals_per_step` = 2 forwards (Heun: twice that again).

A sampler is static (a frozen dataclass: one compiled program per kind); the
guidance scale and labels are arrays. `model_fn(x, t, *y)` is the (quantized)
model.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tmpq_jax.diffusion.flow import SOLVERS, check_sampler, gene_times, grid_from_times
from tmpq_jax.diffusion.guidance import balanced_labels, guided_velocity
from tmpq_jax.diffusion.samplers import ddim_sample
from tmpq_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class DDIM:
    """eta = 0 DDIM over the genome's integer timesteps."""

    num_classes: int = 0
    evals_per_step: int = 1

    def __call__(self, model_fn, x_T, timesteps, sched, labels=None, scale=None):
        return ddim_sample(jax.random.key(0), model_fn, x_T, timesteps, sched)


@dataclasses.dataclass(frozen=True)
class Flow:
    """Euler / Heun over the genome's times; CFG when `guided`."""

    resolution: int
    solver: str = "euler"
    num_classes: int = 0  # > 0: the model takes labels
    null_label: int = 0
    guided: bool = False  # CFG (scale traced); False: the conditional model alone

    @property
    def evals_per_step(self) -> int:
        return (2 if self.solver == "heun" else 1) * (2 if self.guided else 1)

    def __call__(self, model_fn, x_T, timesteps, sched=None, labels=None, scale=None):
        times = grid_from_times(gene_times(jnp.asarray(timesteps), self.resolution))
        if not self.num_classes:
            fn = model_fn
        elif self.guided:
            fn = guided_velocity(model_fn, labels, self.null_label, scale)
        else:
            fn = lambda x, t: model_fn(x, t, labels)  # noqa: E731
        return SOLVERS[self.solver](fn, x_T, times)


def make_sampler(lm, solver: str = "", guidance: float = 1.0):
    """The sampler for `lm` (a `sampling.LoadedModel`): DDIM for a noise-prediction
    model, `solver` ('euler' default, or 'heun') for a flow model; CFG when the
    model is class-conditional and `guidance` != 1. One-line refusals for a
    sampler of the other prediction type and guidance without classes."""
    if lm.prediction == "eps":
        check_sampler(solver or "ddim", lm.prediction)
        if guidance != 1.0:
            raise UserError(
                f"guidance {guidance}: this model is not class-conditional; leave "
                "the guidance scale at 1."
            )
        return DDIM()
    solver = solver or "euler"
    check_sampler(solver, lm.prediction)
    if not lm.num_classes and guidance != 1.0:
        raise UserError(
            f"guidance {guidance}: this model is unconditional (no classes); "
            "leave the guidance scale at 1."
        )
    return Flow(
        resolution=lm.diffusion.num_timesteps,
        solver=solver,
        num_classes=lm.num_classes,
        null_label=lm.null_label if lm.num_classes else 0,
        guided=bool(lm.num_classes) and guidance != 1.0,
    )


def labels_for(sampler, key: jax.Array, num: int) -> jax.Array | None:
    """Class-balanced labels for `num` samples, or None (unconditional)."""
    if not sampler.num_classes:
        return None
    return balanced_labels(key, num, sampler.num_classes)
