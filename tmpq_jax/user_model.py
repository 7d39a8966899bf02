"""A user's own model, named on the command line as `FILE.py:factory` or
`package.module:factory`.

The factory takes no arguments and returns `(module, params, spec)`:
  * `module`: a Flax Linen `nn.Module` or an `nnx.Module` whose call
    `(x, t)` predicts the noise for x f32[B, H, W, C] in [-1, 1] and integer
    timesteps t int32[B] (an NNX module carries its own params: give None);
  * `params`: the Linen module's params (its 'params' collection);
  * `spec`: a dict with `image_size` and `channels`, optionally `diffusion`
    (a dict of `DiffusionConfig` fields), `name`, and `keep_float` (names of
    ops `tmpq layers` lists as left in float, to accept them so).
A model loaded this way remembers its source (`LoadedModel.source`), so a
genome found on it names it, and `tmpq sample --genome` loads it again.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from flax import linen as nn
from flax import nnx

from tmpq_jax.errors import UserError

FACTORY_PREFIX = "factory:"


def _import(target: str):
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise UserError(f"model file {target} does not exist.")
        name = f"tmpq_user_model_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # the user's code: say where it failed, in one line
            raise UserError(
                f"importing {target} failed: {type(e).__name__}: {e}"
            ) from None
        return module
    try:
        return importlib.import_module(target)
    except ImportError as e:
        raise UserError(f"cannot import model module {target!r}: {e}") from None


def load_factory(spec: str):
    """(module, params, spec dict) from `FILE.py:factory` / `module:factory`."""
    target, sep, fn_name = spec.rpartition(":")
    if not sep or not target or not fn_name:
        raise UserError(
            f"model {spec!r}: give FILE.py:factory or package.module:factory."
        )
    factory = getattr(_import(target), fn_name, None)
    if not callable(factory):
        raise UserError(f"{target} has no factory function {fn_name!r}.")
    try:
        out = factory()
    except Exception as e:
        raise UserError(f"{spec}() failed: {type(e).__name__}: {e}") from None
    return _check(spec, out)


def _check(spec: str, out) -> tuple:
    how = "return (module, params, {'image_size': H, 'channels': C})"
    if not isinstance(out, tuple | list) or len(out) != 3:
        raise UserError(f"{spec}() returned {type(out).__name__}; {how}.")
    module, params, info = out
    if not isinstance(module, nn.Module | nnx.Module):
        raise UserError(
            f"{spec}() returned a {type(module).__name__} as its module, not a Flax "
            f"Linen or NNX module; {how}."
        )
    if isinstance(module, nn.Module) and not isinstance(params, dict):
        raise UserError(f"{spec}(): a Linen module needs its params dict; {how}.")
    if not isinstance(info, dict) or not {"image_size", "channels"} <= set(info):
        raise UserError(f"{spec}(): the spec needs image_size and channels; {how}.")
    from tmpq_jax.diffusion.flow import prediction_of

    declared = info.get("prediction") or getattr(
        getattr(module, "config", None), "prediction", "eps"
    )
    if prediction_of(declared) != "eps":  # the sampler and calibration run DDIM
        raise UserError(
            f"{spec}(): a {prediction_of(declared)}-prediction model; --model takes "
            "noise-prediction (eps) models for now (sample a DiT with tmpq sample "
            "--checkpoint)."
        )
    return module, params, info


def load_user_model(spec: str):
    """A `LoadedModel` for the factory `spec`."""
    from tmpq_jax.diffusion.schedules import DiffusionConfig
    from tmpq_jax.models.nnx_model import NNXModel
    from tmpq_jax.sampling import LoadedModel

    module, params, info = load_factory(spec)
    if isinstance(module, nnx.Module):
        module = NNXModel(module)
        params = module.params
    if isinstance(params, dict) and set(params) == {"params"}:
        params = params["params"]  # the whole variables dict was given
    try:
        diffusion = DiffusionConfig(**info.get("diffusion", {}))
    except TypeError as e:
        raise UserError(f"{spec}(): bad diffusion config ({e}).") from None
    lm = LoadedModel.from_module(
        module,
        params,
        image_size=info["image_size"],
        channels=info["channels"],
        diffusion=diffusion,
        name=info.get("name"),
    )
    lm.source = FACTORY_PREFIX + spec
    lm.keep_float = tuple(info.get("keep_float", ()))
    _check_runs(spec, lm)
    return lm


def _check_runs(spec: str, lm) -> None:
    """One abstract call as the library will make it: model(x, t) on the spec's
    image shape; a model that takes other inputs is refused here, in one line."""
    import jax
    import jax.numpy as jnp

    c = lm.config
    x = jax.ShapeDtypeStruct((1, c.image_size, c.image_size, c.channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    try:
        jax.eval_shape(
            lambda p, x, t: lm.model.apply({"params": p}, x, t), lm.params, x, t
        )
    except UserError:
        raise
    except Exception as e:  # the user's code: its first line says where
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserError(
            f"{spec}(): the module does not run as model(x, t) on x f32[1, "
            f"{c.image_size}, {c.image_size}, {c.channels}], t int32[1] "
            f"({type(e).__name__}: {first})."
        ) from None


def resolve_model(checkpoint=None, model: str | None = None):
    """The shipped model, an exported checkpoint, or a factory (one of the two)."""
    from tmpq_jax.sampling import load_model

    if checkpoint and model:
        raise UserError("give a checkpoint directory or a model factory, not both.")
    if model:
        return load_user_model(model)
    return load_model(checkpoint)


def load_source(source: str | None):
    """The model a genome file names (its `model` key), or None if it names none."""
    if not source:
        return None
    if source.startswith(FACTORY_PREFIX):
        return load_user_model(source[len(FACTORY_PREFIX) :])
    from tmpq_jax.sampling import load_model

    return load_model(resolve_source(source))


def resolve_source(source: str | None) -> Path | None:
    """The checkpoint directory a genome's `model` key names (None: none, or a
    factory)."""
    if not source or source.startswith(FACTORY_PREFIX):
        return None
    from tmpq_jax.checkpoint import REPO_ROOT

    for path in (Path(source), REPO_ROOT / source):  # as written: repo-relative
        if path.is_dir():
            return path
    raise UserError(
        f"the genome's model {source} is not found; name the model it was searched on."
    )
