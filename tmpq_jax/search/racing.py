"""Racing: fewer evaluations for the same ranking at the top (successive halving,
one rung; Jamieson & Talwalkar 2016, arXiv 1502.07943; Li et al., Hyperband,
arXiv 1603.06560).

With `search.race_samples` = r > 0, a generation's n candidates are scored twice,
inside its one compiled program:

1. every candidate on the first r rows of the fixed noise batch (a prefix: the
   same rows, and labels, for every candidate; the teacher's samples cut alike);
2. the best `num_kept` of them by that prefix fitness (the budget penalty
   included) on all `num_samples` rows, exactly as without racing. `num_kept` =
   ceil(race_keep * n), at least the GA's elite count (so the elites a GA keeps are
   always fully scored), at most n; a static Python int, so shapes stay fixed.
   Generation 0 also keeps the seed genome (its row 0), on top of those: the
   reference every result is compared with has a full score, and it never takes
   the place of a better candidate among the elites.

The rule for the dropped ones. A prefix score is not comparable with a full one:
FID's small-sample bias is positive and falls as 1/n, so a prefix FID mostly
*overstates* a candidate's full FID, by an amount that depends on the candidate
(the teacher distance is a mean over samples and is comparable, but one rule
serves both). Prefix scores are only ever compared with prefix scores: a dropped
candidate's fitness is the worst full fitness of its generation plus how far its
prefix fitness trails the best dropped candidate's (the next float up where that
is 0). So every dropped candidate ranks below every kept one, the dropped keep
their prefix order (what a CMA-ES or simple GA reads from the whole ranking),
and no dropped candidate can become a GA elite or the search's best. The
archive keeps, per candidate, the score it was measured by (`fid`: prefix or
full), the fitness the strategy was told, and how many samples it was scored on
(`samples`): results (top-k, front, plots) read fully scored entries only.

Work is counted in sample-forwards: samples scored x the model forwards the
compiled sampler spends on each (`forwards_per_sample`: every step of the scan,
x2 for guidance, x2 for Heun), the same count with racing on or off.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp


def num_kept(n: int, keep: float, at_least: int) -> int:
    """How many of `n` candidates are scored on the full batch."""
    return min(n, max(math.ceil(keep * n - 1e-9), at_least, 1))


def generation_samples(cfg, n: int, forced: int = 0) -> int:
    """Samples a generation of `n` candidates scores under `cfg` (a SearchConfig):
    n x num_samples, or with a race the kept ones' full batches (`forced` more
    kept: the seed genome) and the others' prefixes (a race that would keep all
    of them is not run)."""
    keep = num_kept(n, cfg.race_keep, cfg.num_elites) + forced
    if not cfg.race_samples or keep >= n:
        return n * cfg.num_samples
    return keep * cfg.num_samples + (n - keep) * cfg.race_samples


def forwards_per_sample(problem) -> int:
    """Model forwards the compiled sampler spends on one sample of `problem`."""
    sampler = getattr(problem, "sampler", None)
    return problem.space.num_steps * getattr(sampler, "evals_per_step", 1)


def prefix(assets, rows: int):
    """`assets` cut to the first `rows` samples of the noise batch (and its
    labels and teacher samples, paired with it by row). The teacher's spread
    stays that of the whole batch: a fixed unit, so the scores stay comparable."""
    cut = lambda a: None if a is None else a[:rows]  # noqa: E731
    return assets.replace(
        noise=assets.noise[:rows],
        labels=cut(assets.labels),
        teacher=cut(assets.teacher),
        teacher_features=cut(assets.teacher_features),
    )


def dropped_fitness(
    prefix_fit: jax.Array, full_fit: jax.Array, dropped: jax.Array
) -> jax.Array:
    """float[n]: the race's fitness of every candidate as if dropped (the caller
    keeps it for the `dropped` ones only): the worst full fitness `full_fit`
    (float[k]) plus the gap of its prefix fitness over the best dropped one's,
    strictly above that worst full fitness."""
    worst = jnp.max(full_fit)
    best_dropped = jnp.min(jnp.where(dropped, prefix_fit, jnp.inf))
    gap = jnp.where(dropped, prefix_fit - best_dropped, 0.0)
    return jnp.maximum(worst + gap, jnp.nextafter(worst, jnp.inf))


def race(
    score: Callable,
    penalize: Callable,
    assets,
    genomes: jax.Array,
    bitops: jax.Array,
    rows: int,
    keep: int,
    num_samples: int,
    forced: Sequence[int] = (),
):
    """(fid, fitness, samples), each [n], for genomes int32[n, D].

    `score(assets, genomes)`: float[m] (`Problem.population_fid`, or its sharded
    form); `penalize(fid, bitops)`: the fitness; `rows`: the prefix; `keep`: how
    many of the others go on to the full batch (Python ints, keep + len(forced)
    < n); `forced`: rows kept too, whatever their prefix score (the seed genome)."""
    n = genomes.shape[0]
    pre = score(prefix(assets, rows), genomes)
    pre_fit = penalize(pre, bitops)
    rank = pre_fit
    if forced:
        rank = rank.at[jnp.asarray(forced, jnp.int32)].set(-jnp.inf)
    kept = jnp.argsort(rank)[: keep + len(forced)]  # stable: ties to the earlier row
    full = score(assets, genomes[kept])
    full_fit = penalize(full, bitops[kept])
    dropped = jnp.ones((n,), bool).at[kept].set(False)
    fitness = dropped_fitness(pre_fit, full_fit, dropped).at[kept].set(full_fit)
    fid = pre.at[kept].set(full)
    samples = jnp.full((n,), rows, jnp.int32).at[kept].set(num_samples)
    return fid, fitness, samples
