"""The search's settings: frozen dataclasses grouped by concern, built once from a
ConfigDict. The dataclasses hold the only defaults; config files hold overrides.

`SearchConfig` is made of six groups:

* `genome`: what is searched (space, timestep mode, steps, candidate bits, seed);
* `budget`: the BitOPs budget and how it is enforced;
* `evolution`: the strategy and its population sizes;
* `scoring`: the fitness (`fitness` = fid | teacher | ensemble) and its samples;
* `compute`: how the work is laid out (chunks, devices, conv dtype) -- never
  what it computes;
* `output`: re-scoring of the final top-k and how the winner is selected.

Every setting has one name, unique across groups, and that is its key in a config
file, in `--config.search.KEY=VALUE` and in `to_dict` (flat, so result files and
resume signatures keep their keys): `population` is `cfg.evolution.population`,
also readable as `cfg.population`. `SearchConfig(population=8)` and
`SearchConfig(evolution=EvolutionConfig(population=8))` build the same config.

The defaults are TMPQ-DM's protocol (arXiv 2404.09532): population 50,
20 generations, 2000 samples per candidate, N = 10 quad groups, bits {8,7,6,5},
budget = BitOPs of uniform W6A6 at N = 10. `configs/fmnist_search_cpu.py` is the
reduced default `tmpq search` runs on a CPU.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp
import ml_collections

from tmpq_jax.errors import UserError
from tmpq_jax.quant.supernet import DEFAULT_CANDIDATES, check_candidates

TIMESTEP_MODES = ("grouped", "free", "variable")
# timesteps_fp: the timesteps searched with the model in full precision (no layer
# quantized: AutoDiffusion's setting, the float baseline of a timestep search).
SPACES = ("joint", "precision", "timesteps", "timesteps_fp")
CONSTRAINTS = ("repair", "penalty")
CONV_DTYPES = ("float32", "bfloat16")
# What a candidate is scored by (search/fitness.py): FID against the fitness net's
# train-split statistics; distance to the full-precision teacher's samples from
# the same noise; the mean FID over several feature spaces.
FITNESSES = ("fid", "teacher", "ensemble")
# What the final top-k are re-ranked by: the search's own fitness, or another of
# these that the search did not optimize (`pixels`: FID of pooled pixels against
# the train split). Never an evaluation space: those only report.
SELECTIONS = ("fitness", *FITNESSES, "pixels")
TEACHER_SCHEDULES = ("quad", "uniform")
# single: the best genome at the budget; front: the (fitness, total BitOPs) front
# below it, from one search (a strategy of two objectives: nsga2).
OBJECTIVES = ("single", "front")


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise UserError(f"search.{name}={value!r}: use one of {list(allowed)}.")


def _at_least(cfg, names, low: int) -> None:
    for name in names:
        if getattr(cfg, name) < low:
            raise UserError(f"search.{name}={getattr(cfg, name)}: must be >= {low}.")


@dataclasses.dataclass(frozen=True)
class GenomeConfig:
    """What is searched."""

    # joint | precision (quad steps fixed) | timesteps (bits fixed) | timesteps_fp
    # (the float model; a budget it can meet: budget_w_bits = budget_a_bits = 32)
    space: str = "joint"
    timestep_mode: str = (
        "grouped"  # grouped (one step per quad group) | free | variable
    )
    num_steps: int = 10  # N; the maximum N in `variable` mode
    min_steps: int = 2  # `variable` mode only
    candidates: tuple[int, ...] = DEFAULT_CANDIDATES
    # Seed genome / bits of the `timesteps` space: uniform W{seed_w}A{seed_a}.
    seed_w_bits: int = 6
    seed_a_bits: int = 6
    # Flow (velocity) models only: the ODE solver, the shift of the time grid (its
    # groups and the seed) and the guidance scale (1: the conditional model alone;
    # else classifier-free guidance, which doubles the forwards and the BitOPs).
    solver: str = "euler"
    shift: float = 1.0
    guidance: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "candidates", tuple(int(c) for c in self.candidates))
        _one_of("space", self.space, SPACES)
        _one_of("solver", self.solver, ("euler", "heun"))
        if not self.shift > 0 or self.guidance < 0:
            raise UserError(
                f"search.shift={self.shift}, guidance={self.guidance}: the shift must "
                "be > 0 and the guidance scale >= 0 (1: no guidance)."
            )
        _one_of("timestep_mode", self.timestep_mode, TIMESTEP_MODES)
        check_candidates(self.candidates)
        for name in ("seed_w_bits", "seed_a_bits"):
            if getattr(self, name) not in self.candidates:
                raise UserError(
                    f"search.{name}={getattr(self, name)} is not in the candidate set "
                    f"{list(self.candidates)}; pick one of them."
                )
        _at_least(self, ("num_steps",), 1)
        if (
            self.timestep_mode == "variable"
            and not 1 <= self.min_steps <= self.num_steps
        ):
            raise UserError(
                f"search.min_steps={self.min_steps}: use 1..num_steps ({self.num_steps})."
            )


@dataclasses.dataclass(frozen=True)
class BudgetConfig:
    """Total BitOPs of uniform W{budget_w}A{budget_a} over budget_steps."""

    budget_w_bits: int = 6
    budget_a_bits: int = 6
    budget_steps: int = 10
    constraint: str = "repair"  # repair | penalty
    penalty_weight: float = 1000.0  # fitness += weight * relative BitOPs excess

    def __post_init__(self):
        _one_of("constraint", self.constraint, CONSTRAINTS)
        _at_least(self, ("budget_steps",), 1)


@dataclasses.dataclass(frozen=True)
class EvolutionConfig:
    """The strategy and its population (TMPQ-DM's GA by default)."""

    strategy: str = "tmpq_ga"  # objective=front: this default becomes nsga2
    objective: str = "single"  # single | front (see OBJECTIVES)
    population: int = 50
    generations: int = 20  # including generation 0 (the initial population)
    elite_frac: float = 0.2  # paper: top 10 of 50
    mutant_frac: float = 0.5  # paper: 25 mutations
    crossover_frac: float = 0.2  # paper: 10 crossovers; the rest is random refill
    mutation_prob: float = 0.25
    init_mutant_frac: float = 0.48  # paper: 24 mutations of the seed, 25 random
    es_std: float = 0.15  # simple_ga / cma_es, in unit-box coordinates
    seed: int = 0

    def __post_init__(self):
        from tmpq_jax.search.strategies import REGISTRY  # lazy: it imports this module

        _one_of("strategy", self.strategy, REGISTRY)
        _one_of("objective", self.objective, OBJECTIVES)
        if self.objective == "front" and self.strategy == "tmpq_ga":
            object.__setattr__(self, "strategy", "nsga2")
        fronts = [n for n, c in REGISTRY.items() if getattr(c, "objectives", 1) > 1]
        if (self.strategy in fronts) != (self.objective == "front"):
            raise UserError(
                f"search.strategy={self.strategy!r} with objective={self.objective!r}: "
                f"a front (objective='front') is searched by one of {fronts}, a "
                "single genome by the others."
            )
        _at_least(self, ("population", "generations"), 1)
        if self.population < 4:
            raise UserError(f"search.population={self.population}: use at least 4.")
        if not 0.0 <= self.mutation_prob <= 1.0:
            raise UserError(f"search.mutation_prob={self.mutation_prob}: use 0..1.")
        fracs = self.elite_frac + self.mutant_frac + self.crossover_frac
        if not 0.0 < self.elite_frac < 1.0 or fracs > 1.0 + 1e-9:
            raise UserError(
                "search.elite_frac/mutant_frac/crossover_frac: elite_frac in (0, 1) "
                f"and the three summing to at most 1 (got {fracs:.3f})."
            )


@dataclasses.dataclass(frozen=True)
class ScoringConfig:
    """The fitness a candidate is scored by, on `num_samples` images of one fixed
    noise batch. `fid` and `ensemble` compare with the train split's statistics
    only (never the test split's, which every reported figure uses)."""

    # teacher (pixels only, the weight below at 0): at W6A6 on the GPU its genomes
    # beat full precision on the same steps in every evaluation space, where fid's
    # and the feature-weighted teacher's lose in pixels (3 seeds; docs/results.md);
    # it needs no dataset statistics and no feature net.
    fitness: str = "teacher"  # teacher | fid | ensemble (see FITNESSES)
    num_samples: int = 2000
    # teacher: the full-precision model's DDIM samples over `teacher_steps` steps
    # (at least the candidates' most) from the same noise, made once per search;
    # the fitness is the candidate's squared distance to them relative to the
    # teacher's spread, in pixels plus `teacher_feature_weight` times the same in
    # the fitness net's features (0: pixels only, no feature net read; with the
    # features' term the genomes missed full precision in pixels, docs/results.md).
    teacher_steps: int = 100
    teacher_schedule: str = "uniform"  # quad repeats steps at 100 of 1000
    teacher_feature_weight: float = 0.0
    # Racing (search/racing.py): every candidate is scored on the first
    # `race_samples` rows of the noise batch, the best `race_keep` of them (at
    # least the elite count) on all `num_samples`; the rest rank below every one
    # of those. 0: off (every candidate on all samples).
    race_samples: int = 0
    race_keep: float = 0.25

    def __post_init__(self):
        _one_of("fitness", self.fitness, FITNESSES)
        _one_of("teacher_schedule", self.teacher_schedule, TEACHER_SCHEDULES)
        _at_least(self, ("num_samples", "teacher_steps"), 1)
        _at_least(self, ("race_samples",), 0)
        if self.teacher_feature_weight < 0:
            raise UserError(
                f"search.teacher_feature_weight={self.teacher_feature_weight}: use "
                ">= 0."
            )
        if not 0.0 < self.race_keep < 1.0:
            what = "keeps no candidate" if self.race_keep <= 0 else "drops none"
            raise UserError(
                f"search.race_keep={self.race_keep}: a halving schedule that {what}; "
                "use a fraction in (0, 1), e.g. 0.25 (race_samples=0 turns racing off)."
            )
        if self.race_samples >= self.num_samples:
            raise UserError(
                f"search.race_samples={self.race_samples}: the race's prefix must be "
                f"fewer than num_samples={self.num_samples}; use fewer, or 0 (off)."
            )


def fitness_label(search) -> str:
    """The fitness as result rows name it: its name, except a teacher whose feature
    term is weighted other than 1 (`teacher_pixels` at 0: pixels only)."""
    w = search.teacher_feature_weight
    if search.fitness != "teacher" or w == 1.0:
        return search.fitness
    return "teacher_pixels" if w == 0 else f"teacher_w{w:g}"


@dataclasses.dataclass(frozen=True)
class ComputeConfig:
    """How the work is laid out: memory and devices, not what is computed."""

    candidate_chunk: int = 1  # candidates vmapped together (lax.map batch_size)
    sample_chunk: int = 0  # images sampled together per candidate (0: all at once)
    # Devices along the population axis of the mesh (the rest split each
    # candidate's samples); 0: auto (search/sharding.py).
    pop_shards: int = 0
    # Convolutions on the integer values: bfloat16 is exact for them (f32 sums),
    # but measured slower than float32 on the H100 (benchmarks/results/perf.json).
    conv_dtype: str = "float32"

    def __post_init__(self):
        _one_of("conv_dtype", self.conv_dtype, CONV_DTYPES)
        _at_least(self, ("candidate_chunk",), 1)
        if self.pop_shards < 0:
            raise UserError(
                f"search.pop_shards={self.pop_shards}: use 0 (auto) or more."
            )
        if self.sample_chunk < 0:
            raise UserError(
                f"search.sample_chunk={self.sample_chunk}: use 0 (all at once) or more."
            )


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    """The final top-k: re-scored on fresh samples, re-ranked by `select`."""

    rescore_top_k: int = 10
    rescore_samples: int = 10_000
    # 2000: what the paper-protocol runs used (rescore noise is drawn a batch at a
    # time, so this also fixes which fresh samples are drawn).
    rescore_batch: int = 2000
    select: str = "fitness"  # see SELECTIONS

    def __post_init__(self):
        _one_of("select", self.select, SELECTIONS)
        _at_least(self, ("rescore_top_k", "rescore_batch"), 1)


GROUPS: dict[str, type] = {
    "genome": GenomeConfig,
    "budget": BudgetConfig,
    "evolution": EvolutionConfig,
    "scoring": ScoringConfig,
    "compute": ComputeConfig,
    "output": OutputConfig,
}
# Every setting's group, by its (unique) name.
GROUP_OF: dict[str, str] = {
    f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)
}


@dataclasses.dataclass(frozen=True, init=False)
class SearchConfig:
    genome: GenomeConfig
    budget: BudgetConfig
    evolution: EvolutionConfig
    scoring: ScoringConfig
    compute: ComputeConfig
    output: OutputConfig

    def __init__(self, **kw):
        """Groups by name (`evolution=EvolutionConfig(...)` or a dict of its
        settings) and/or single settings by name (`population=8`)."""
        unknown = sorted(k for k in kw if k not in GROUPS and k not in GROUP_OF)
        if unknown:
            raise UserError(
                f"unknown keys {unknown} in config.search; known: {sorted(GROUP_OF)}."
            )
        for group, cls in GROUPS.items():
            base = kw.get(group, {})
            if isinstance(base, cls):
                base = dataclasses.asdict(base)
            elif not isinstance(base, dict):
                raise UserError(f"config.search.{group}: expected a mapping.")
            bad = sorted(set(base) - {f.name for f in dataclasses.fields(cls)})
            if bad:
                raise UserError(f"unknown keys {bad} in config.search.{group}.")
            flat = {k: v for k, v in kw.items() if GROUP_OF.get(k) == group}
            object.__setattr__(self, group, cls(**{**base, **flat}))
        self.validate()

    def __getattr__(self, name: str):
        """A setting read by its name alone: `cfg.population`."""
        group = GROUP_OF.get(name)
        if group is None:
            raise AttributeError(f"SearchConfig has no setting {name!r}")
        return getattr(object.__getattribute__(self, group), name)

    def __reduce__(self):  # pickling goes through the flat settings
        return (_from_flat, (self.to_dict(),))

    def validate(self) -> None:
        """Checks across groups (each group checks its own settings)."""
        if (
            self.objective == "front"
            and self.space in ("timesteps", "timesteps_fp")
            and self.timestep_mode != "variable"
        ):
            raise UserError(
                "search.objective='front' has one objective here: with "
                f"space={self.space!r} and timestep_mode={self.timestep_mode!r} every "
                "genome costs the same BitOPs; search bits (space=joint or precision) "
                "or the step count (timestep_mode=variable), or use objective=single."
            )
        if self.fitness == "teacher" and self.teacher_steps < self.num_steps:
            raise UserError(
                f"search.teacher_steps={self.teacher_steps} is fewer than the "
                f"candidates' {self.num_steps} steps: the teacher must take at least "
                "as many; raise teacher_steps."
            )
        if self.race_samples and self.objective == "front":
            raise UserError(
                f"search.race_samples={self.race_samples} with objective='front': a "
                "race ranks one fitness, a front two objectives; use race_samples=0."
            )
        if self.select == "teacher" and self.teacher_steps < self.num_steps:
            raise UserError(
                f"search.select='teacher' with teacher_steps={self.teacher_steps} "
                f"below the candidates' {self.num_steps} steps; raise teacher_steps."
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

    @property
    def samples_scored(self) -> int:
        """Samples the generations score in all (fewer with racing)."""
        from tmpq_jax.search.racing import generation_samples  # it reads this module

        first = generation_samples(self, self.population, forced=1)  # + the seed
        return first + (self.generations - 1) * generation_samples(self, self.offspring)

    @property
    def forwards_per_step(self) -> int:
        """Model forwards per sample and step: guidance runs two, Heun twice that
        (flow models; a noise-prediction model refuses both, `search/sampler.py`)."""
        return (2 if self.guidance != 1.0 else 1) * (2 if self.solver == "heun" else 1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchConfig:
        """From flat settings, groups, or both (see the module doc)."""
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        """Every setting by its name, flat (result files, resume signatures)."""
        out = {}
        for group in GROUPS:
            out.update(dataclasses.asdict(getattr(self, group)))
        return json.loads(json.dumps(out))

    def to_nested_dict(self) -> dict[str, Any]:
        return json.loads(
            json.dumps({g: dataclasses.asdict(getattr(self, g)) for g in GROUPS})
        )

    def replace(self, **changes) -> SearchConfig:
        """A copy with some settings (or groups) changed."""
        return SearchConfig(**{**self.to_dict(), **changes})

    # Keys that may change between a run and its resume (they don't change results
    # of the generations: outputs and memory layout only).
    RESUME_FREE = (
        "rescore_top_k",
        "rescore_samples",
        "rescore_batch",
        "select",
        "candidate_chunk",
        "conv_dtype",
        "pop_shards",
    )

    @property
    def conv_jnp_dtype(self):
        """None: AQT's own float32 conv; else the integer conv's dtype."""
        return None if self.conv_dtype == "float32" else jnp.bfloat16


def _from_flat(d: dict) -> SearchConfig:
    return SearchConfig(**d)


@dataclasses.dataclass(frozen=True)
class SearchRunConfig:
    """A search config file: what to search on, and how."""

    search: SearchConfig = dataclasses.field(default_factory=SearchConfig)
    model: str | None = None  # exported model dir; None: the shipped model
    # The fitness's feature net (fitness fid, teacher's feature term, and the
    # first of an ensemble); None: the shipped FMNIST classifier.
    feature_net: str | None = None
    # fitness=ensemble: the other nets of the ensemble (the feature_net is always
    # in it); empty: the shipped second fitness classifier.
    ensemble_nets: tuple[str, ...] = ()
    # Nets the search never sees, for the reported figures only; None: the shipped
    # evaluation nets when they were made from the model's data, else none.
    eval_nets: tuple[str, ...] | None = None
    # Calibration: the named one, else the shipped one if it fits the model and
    # candidates, else one made with these settings (see `tmpq calibrate`).
    calibration: str | None = None
    calib_timesteps: int = 20  # Q-Diffusion: 20 x 32
    calib_samples: int = 32
    calib_seed: int = 0
    calib_reconstruct_steps: int = 0  # > 0: block reconstruction, this many steps
    calib_bias_correction: bool = False

    def __post_init__(self):
        for name in ("ensemble_nets", "eval_nets"):
            v = getattr(self, name)
            if v is not None:
                if isinstance(v, str):
                    v = (v,)
                object.__setattr__(self, name, tuple(str(p) for p in v))
        for name in ("calib_timesteps", "calib_samples"):
            if getattr(self, name) < 1:
                raise UserError(f"config.{name}={getattr(self, name)}: use >= 1.")
        if self.calib_reconstruct_steps < 0:
            raise UserError("config.calib_reconstruct_steps: use 0 (none) or more.")

    @classmethod
    def from_configdict(cls, cd) -> SearchRunConfig:
        d = cd.to_dict() if hasattr(cd, "to_dict") else dict(cd)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(
                f"unknown keys {unknown} in config; known: {sorted(known)}."
            )
        d["search"] = SearchConfig.from_dict(dict(d.get("search", {})))
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["search"] = self.search.to_dict()
        return json.loads(json.dumps(d))


def default_configdict() -> ml_collections.ConfigDict:
    """Every setting at its dataclass default, as the ConfigDict a config file
    starts from (so any of them can be overridden, and none is restated)."""
    d = SearchRunConfig().to_dict()
    d["search"]["candidates"] = tuple(d["search"]["candidates"])
    d["ensemble_nets"] = tuple(d["ensemble_nets"])
    return ml_collections.ConfigDict(d)
