"""Flow matching (rectified flow): the training objective, time grids and ODE samplers.

Convention (SD3, arXiv 2403.03206): x_t = (1 - t) x0 + t noise, t in [0, 1], t = 1
is pure noise; the model predicts the velocity v = dx_t/dt = noise - x0, and
sampling integrates dx/dt = v from t = 1 down to t = 0.

Samplers take `times`, a float array t_0 = 1 > t_1 > ... > t_N = 0 (N steps,
N + 1 points) that may be traced: one compiled sampler serves every grid of the
same length. A repeated time (dt = 0) is an exact no-op step, so a grid of n < N
distinct steps padded with repeats samples like the n-step grid (as DDIM's
repeated timesteps do, `samplers.py`).

Continuous-time genome (the analogue of `quad_group_bounds` for integer steps).
For N steps the edges e_k = shift(k / N), k = 0..N, ascending from e_0 = 0 to
e_N = 1, cut [0, 1] into N groups; group i (i = 1..N) is (e_{i-1}, e_i] and holds
one sampling time. Its default ("first") element is its upper edge e_i, the first
time of the group that sampling from t = 1 down meets, so the default genome gives
the model-evaluation times e_N = 1, ..., e_1 and, with the endpoint 0 appended
(`grid_from_times`), exactly the shifted N-step grid `flow_times(N, shift)`.
`flow_group_bounds` returns the float edges; an integer genome at resolution R
(gene k stands for t = k / R) gives group i the integers in (R e_{i-1}, R e_i].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tmpq_jax.errors import UserError, check_keys

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]
T_SAMPLING = ("logit_normal", "uniform")


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    """The flow-matching objective: how training draws t, and label dropout."""

    t_sampling: str = "logit_normal"  # or "uniform"
    logit_mean: float = 0.0  # logit-normal: t = sigmoid(mean + std * N(0, 1))
    logit_std: float = 1.0
    label_dropout: float = 0.1  # P(label -> null class): trains the CFG branch

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FlowConfig:
        check_keys(cls, d, "config.flow")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.t_sampling not in T_SAMPLING:
            raise UserError(
                f"flow.t_sampling {self.t_sampling!r}: use one of {list(T_SAMPLING)}."
            )
        if not 0.0 <= self.label_dropout < 1.0 or self.logit_std <= 0:
            raise UserError(
                "flow.label_dropout must lie in [0, 1) and flow.logit_std be > 0."
            )


# --- the objective -----------------------------------------------------------


def interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = (1 - t) x0 + t noise, t of shape [B]."""
    t = t.reshape(t.shape + (1,) * (x0.ndim - t.ndim))
    return (1.0 - t) * x0 + t * noise


def sample_t(key: jax.Array, n: int, cfg: FlowConfig) -> jax.Array:
    """n training times in (0, 1): logit-normal (SD3's default) or uniform."""
    if cfg.t_sampling == "uniform":
        return jax.random.uniform(key, (n,))
    return jax.nn.sigmoid(cfg.logit_mean + cfg.logit_std * jax.random.normal(key, (n,)))


def drop_labels(
    key: jax.Array, labels: jax.Array, p: float, null_label: int
) -> jax.Array:
    """Each label becomes the null class with probability p (CFG training)."""
    return jnp.where(jax.random.bernoulli(key, p, labels.shape), null_label, labels)


def flow_loss(
    params,
    model: nn.Module,
    cfg: FlowConfig,
    x0: jax.Array,
    labels: jax.Array | None,
    key: jax.Array,
    null_label: int | None = None,
) -> jax.Array:
    """Mean squared error of the predicted velocity noise - x0 at x_t.

    `labels=None`: an unconditional model (called without labels). Otherwise they
    are dropped to `null_label` with probability `cfg.label_dropout`.
    """
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    t = sample_t(k_t, x0.shape[0], cfg)
    noise = jax.random.normal(k_noise, x0.shape)
    x_t = interpolate(x0, noise, t)
    if labels is None:
        pred = model.apply({"params": params}, x_t, t)
    else:
        y = drop_labels(k_drop, labels, cfg.label_dropout, null_label)
        pred = model.apply({"params": params}, x_t, t, y)
    return jnp.mean((pred - (noise - x0)) ** 2)


# --- time grids ---------------------------------------------------------------


def shift_time(t, shift: float):
    """SD3's resolution shift t' = s t / (1 + (s - 1) t): s > 1 spends more of a
    uniform grid near t = 1 (noise). Works on numpy and jax arrays."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def _check(num_steps: int, shift: float) -> None:
    if num_steps < 1:
        raise UserError(f"--steps {num_steps}: use at least one sampling step.")
    if not shift > 0:
        raise UserError(f"shift {shift}: use a positive shift (1 = no shift).")


def flow_group_bounds(num_steps: int, shift: float = 1.0) -> np.ndarray:
    """Group edges [0, e_1, ..., e_{N-1}, 1] ascending: group i is (e_{i-1}, e_i]."""
    _check(num_steps, shift)
    edges = shift_time(np.linspace(0.0, 1.0, num_steps + 1), shift)
    edges[0], edges[-1] = 0.0, 1.0  # exact ends whatever the rounding
    return edges.astype(np.float32)


def flow_times(num_steps: int, shift: float = 1.0) -> np.ndarray:
    """The shifted N-step sampling grid [1, ..., 0] (N + 1 points, descending):
    the default element (upper edge) of every group, then the endpoint 0."""
    return flow_group_bounds(num_steps, shift)[::-1].copy()


def grid_from_times(times: jax.Array) -> jax.Array:
    """N model-evaluation times (one per group, any order; traced OK) -> the
    sampler's grid: sorted descending, the endpoint 0 appended."""
    times = jnp.asarray(times, jnp.float32)
    return jnp.concatenate([-jnp.sort(-times), jnp.zeros((1,), jnp.float32)])


# --- ODE samplers -------------------------------------------------------------


def _steps(times: jax.Array):
    times = jnp.asarray(times, jnp.float32)
    return times[:-1], times[1:]


def euler_sample(velocity_fn: VelocityFn, x: jax.Array, times: jax.Array) -> jax.Array:
    """Euler from x at times[0] over `times` (descending to 0): N model calls."""

    def body(x, tt):
        t, t_next = tt
        v = velocity_fn(x, jnp.full((x.shape[0],), t))
        return x + (t_next - t) * v, None

    x0, _ = jax.lax.scan(body, x, _steps(times))
    return x0


def heun_sample(velocity_fn: VelocityFn, x: jax.Array, times: jax.Array) -> jax.Array:
    """Heun (explicit trapezoid, 2nd order) over `times`: 2N model calls.

    The last step ends at t = 0 and still takes its corrector: the velocity is
    defined there (unlike EDM's denoiser at sigma = 0).
    """

    def body(x, tt):
        t, t_next = tt
        dt = t_next - t
        v = velocity_fn(x, jnp.full((x.shape[0],), t))
        v_next = velocity_fn(x + dt * v, jnp.full((x.shape[0],), t_next))
        return x + dt * 0.5 * (v + v_next), None

    x0, _ = jax.lax.scan(body, x, _steps(times))
    return x0


SOLVERS = {"euler": euler_sample, "heun": heun_sample}


# --- what a model predicts, and which samplers fit it ---------------------------

# Each sampler and the one prediction type it integrates.
SAMPLER_PREDICTION = {
    "ddim": "eps",
    "ddpm": "eps",
    "euler": "velocity",
    "heun": "velocity",
}


def prediction_of(model: Any) -> str:
    """'eps' or 'velocity' as a model declares it: a config with a `prediction`
    field, an exported model's card (its `prediction` key, else its model
    config's), or the string itself. Configs without the field (the UNet) are eps."""
    if isinstance(model, str):
        return model
    if isinstance(model, Mapping):
        if "prediction" in model:
            return str(model["prediction"])
        return str(model.get("config", {}).get("model", {}).get("prediction", "eps"))
    return str(getattr(model, "prediction", "eps"))


def check_sampler(sampler: str, model: Any) -> None:
    """Refuses a sampler that integrates another prediction type than `model`'s."""
    if sampler not in SAMPLER_PREDICTION:
        raise UserError(
            f"unknown sampler {sampler!r}; use one of {sorted(SAMPLER_PREDICTION)}."
        )
    want, have = SAMPLER_PREDICTION[sampler], prediction_of(model)
    if want != have:
        fits = sorted(s for s, p in SAMPLER_PREDICTION.items() if p == have)
        raise UserError(
            f"the {sampler} sampler needs a {want}-prediction model but this model "
            f"predicts {have}; use one of {fits}."
        )


def flow_sample(
    velocity_fn: VelocityFn,
    x1: jax.Array,
    times: jax.Array,
    solver: str = "euler",
    model: Any = "velocity",
) -> jax.Array:
    """Integrates from noise `x1` over `times` with `solver` ('euler' / 'heun'),
    after checking that `model` (config, card or prediction string) is a
    velocity model. Returns x_0 (unclipped)."""
    check_sampler(solver, model)
    return SOLVERS[solver](velocity_fn, x1, times)


# --- integer time genes ---------------------------------------------------------
# The search's genomes are integer vectors; gene k stands for the time
# t = (k + 1) / R (k in [0, R), so t in (0, 1]), R = `resolution`.


def gene_times(genes, resolution: int):
    """Model-evaluation times of integer time genes (numpy or jax)."""
    return (genes + 1.0) / resolution


def flow_gene_groups(
    num_steps: int, shift: float = 1.0, resolution: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) int32[N], ascending, hi exclusive: group i holds the genes whose
    time lies in (e_{i-1}, e_i] (`flow_group_bounds`); its largest gene, hi - 1,
    is the upper edge e_i, so the genes hi - 1 give the shifted grid
    `flow_times(N, shift)`. Refuses groups too narrow to hold one gene."""
    _check(num_steps, shift)
    edges = shift_time(np.linspace(0.0, 1.0, num_steps + 1, dtype=np.float64), shift)
    scaled = np.floor(np.round(edges * resolution, 6)).astype(np.int64)
    lo, hi = scaled[:-1], scaled[1:]
    if np.any(hi <= lo):
        raise UserError(
            f"{num_steps} steps at shift {shift}: a time group is narrower than "
            f"1/{resolution}; use fewer steps or a shift nearer 1."
        )
    return lo.astype(np.int32), hi.astype(np.int32)
