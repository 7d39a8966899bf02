"""The search's settings: one frozen dataclass, built once from a ConfigDict.

`configs/fmnist_search.py` is TMPQ-DM's protocol (arXiv 2404.09532): population 50,
20 generations, 2000 samples per candidate, N = 10 quad groups, bits {8,7,6,5},
budget = BitOPs of uniform W6A6 at N = 10. `configs/fmnist_search_cpu.py` is the
reduced default `tmpq search` runs on a CPU.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp

from tmpq_jax.errors import UserError, check_keys
from tmpq_jax.quant.supernet import DEFAULT_CANDIDATES, check_candidates

STRATEGIES = ("tmpq_ga", "simple_ga", "cma_es", "random")
TIMESTEP_MODES = ("grouped", "free", "variable")
SPACES = ("joint", "precision", "timesteps")
CONSTRAINTS = ("repair", "penalty")
CONV_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    # What is searched.
    space: str = (
        "joint"  # joint | precision (quad steps fixed) | timesteps (bits fixed)
    )
    timestep_mode: str = (
        "grouped"  # grouped (one step per quad group) | free | variable
    )
    num_steps: int = 10  # N; the maximum N in `variable` mode
    min_steps: int = 2  # `variable` mode only
    candidates: tuple[int, ...] = DEFAULT_CANDIDATES
    # Seed genome / bits of the `timesteps` space: uniform W{seed_w}A{seed_a}.
    seed_w_bits: int = 6
    seed_a_bits: int = 6
    # The budget: total BitOPs of uniform W{budget_w}A{budget_a} over budget_steps.
    budget_w_bits: int = 6
    budget_a_bits: int = 6
    budget_steps: int = 10
    constraint: str = "repair"  # repair | penalty
    penalty_weight: float = 1000.0  # fitness += weight * relative BitOPs excess
    # The strategy.
    strategy: str = "tmpq_ga"
    population: int = 50
    generations: int = 20  # including generation 0 (the initial population)
    elite_frac: float = 0.2  # paper: top 10 of 50
    mutant_frac: float = 0.5  # paper: 25 mutations
    crossover_frac: float = 0.2  # paper: 10 crossovers; the rest is random refill
    mutation_prob: float = 0.25
    init_mutant_frac: float = 0.48  # paper: 24 mutations of the seed, 25 random
    es_std: float = 0.15  # simple_ga / cma_es, in unit-box coordinates
    # Fitness.
    num_samples: int = 2000
    candidate_chunk: int = 1  # candidates vmapped together (lax.map batch_size)
    sample_chunk: int = 0  # images sampled together per candidate (0: all at once)
    # Devices along the population axis of the mesh (the rest split each
    # candidate's samples); 0: auto (search/sharding.py).
    pop_shards: int = 0
    # Convolutions on the integer values: bfloat16 is exact for them (f32 sums),
    # but measured slower than float32 on the H100 (benchmarks/results/perf.json).
    conv_dtype: str = "float32"
    seed: int = 0
    # Output.
    rescore_top_k: int = 10
    rescore_samples: int = 10_000
    rescore_batch: int = 1000

    def __post_init__(self):
        object.__setattr__(self, "candidates", tuple(int(c) for c in self.candidates))
        self.validate()

    def validate(self) -> None:
        for field, allowed in (
            ("strategy", STRATEGIES),
            ("timestep_mode", TIMESTEP_MODES),
            ("space", SPACES),
            ("constraint", CONSTRAINTS),
            ("conv_dtype", CONV_DTYPES),
        ):
            if getattr(self, field) not in allowed:
                raise UserError(
                    f"search.{field}={getattr(self, field)!r}: use one of {list(allowed)}."
                )
        check_candidates(self.candidates)
        for name in ("seed_w_bits", "seed_a_bits"):
            if getattr(self, name) not in self.candidates:
                raise UserError(
                    f"search.{name}={getattr(self, name)} is not in the candidate set "
                    f"{list(self.candidates)}; pick one of them."
                )
        positive = ("population", "generations", "num_samples", "num_steps")
        for name in positive + ("candidate_chunk", "rescore_batch", "budget_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"search.{name}={getattr(self, name)}: must be >= 1.")
        if self.population < 4:
            raise UserError(f"search.population={self.population}: use at least 4.")
        if (
            self.timestep_mode == "variable"
            and not 1 <= self.min_steps <= self.num_steps
        ):
            raise UserError(
                f"search.min_steps={self.min_steps}: use 1..num_steps ({self.num_steps})."
            )
        if not 0.0 <= self.mutation_prob <= 1.0:
            raise UserError(f"search.mutation_prob={self.mutation_prob}: use 0..1.")
        fracs = self.elite_frac + self.mutant_frac + self.crossover_frac
        if not 0.0 < self.elite_frac < 1.0 or fracs > 1.0 + 1e-9:
            raise UserError(
                "search.elite_frac/mutant_frac/crossover_frac: elite_frac in (0, 1) "
                f"and the three summing to at most 1 (got {fracs:.3f})."
            )
        if self.pop_shards < 0:
            raise UserError(
                f"search.pop_shards={self.pop_shards}: use 0 (auto) or more."
            )
        if self.sample_chunk < 0:
            raise UserError(
                f"search.sample_chunk={self.sample_chunk}: use 0 (all at once) or more."
            )

    # Derived sizes of the GA's population.
    @property
    def num_elites(self) -> int:
        return max(1, round(self.elite_frac * self.population))

    @property
    def offspring(self) -> int:
        """Candidates evaluated per generation after the first (the GA keeps its
        elites' scores; every strategy evaluates this many, for equal budgets)."""
        return self.population - self.num_elites

    @property
    def evaluations(self) -> int:
        return self.population + (self.generations - 1) * self.offspring

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchConfig:
        check_keys(cls, d, "config.search")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    # Keys that may change between a run and its resume (they don't change results
    # of the generations: outputs and memory layout only).
    RESUME_FREE = (
        "rescore_top_k",
        "rescore_samples",
        "rescore_batch",
        "candidate_chunk",
        "conv_dtype",
        "pop_shards",
    )

    @property
    def conv_jnp_dtype(self):
        """None: AQT's own float32 conv; else the integer conv's dtype."""
        return None if self.conv_dtype == "float32" else jnp.bfloat16


@dataclasses.dataclass(frozen=True)
class SearchRunConfig:
    """A search config file: what to search on, and how."""

    search: SearchConfig
    model: str | None = None  # exported model dir; None: the shipped model
    calibration: str | None = None  # None: shipped if it fits, else calibrate
    feature_net: str | None = None  # None: the shipped FMNIST classifier
    calib_timesteps: int = 20  # when calibrating (Q-Diffusion: 20 x 32)
    calib_samples: int = 32

    @classmethod
    def from_configdict(cls, cd) -> SearchRunConfig:
        d = cd.to_dict() if hasattr(cd, "to_dict") else dict(cd)
        check_keys(cls, d, "config")
        d["search"] = SearchConfig.from_dict(dict(d.get("search", {})))
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))
