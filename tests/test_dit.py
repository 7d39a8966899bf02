"""The DiT (linen and NNX), its flow-matching training, resume and config."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tmpq_jax.config import DataConfig, TrainConfig, load_config
from tmpq_jax.diffusion.flow import FlowConfig, flow_loss
from tmpq_jax.errors import UserError
from tmpq_jax.models.dit import DiT, DiTConfig, init_params, load_dit
from tmpq_jax.models.dit_nnx import TINY_NNX_DIT, DiTNNX
from tmpq_jax.models.unet import count_params
from tmpq_jax.train.loop import FlowExperimentConfig, experiment_config, train
from tmpq_jax.train.step import create_train_state

# 16x16 to match conftest's blobs dataset; patch 4: 16 tokens.
TINY_DIT = DiTConfig(
    image_size=16,
    channels=1,
    patch=4,
    width=32,
    depth=1,
    heads=2,
    num_classes=2,
    time_embed_dim=32,
)


@pytest.fixture(scope="module")
def held_out(tiny_npz):
    """(loss, grads) of the flow loss on one fixed batch, times and noise: one
    compiled forward + backward for the tests below."""
    x0 = jnp.asarray(np.load(tiny_npz)["images"][:32, ..., None]) / 127.5 - 1.0
    labels = jnp.asarray(np.arange(32) % 2, jnp.int32)
    loss = lambda p: flow_loss(
        p, DiT(TINY_DIT), FlowConfig(), x0, labels, jax.random.key(5), 2
    )
    return jax.jit(jax.value_and_grad(loss))


def test_forward_backward_and_layers(held_out, key):
    params = init_params(TINY_DIT, key)
    _, grads = held_out(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    # adaLN-Zero: the untrained model outputs zeros, so only its head gets a
    # gradient at first (every gate and the head's modulation are zero)
    live = {
        jax.tree_util.keystr(path)
        for path, g in jax.tree_util.tree_leaves_with_path(grads)
        if float(jnp.abs(g).max()) > 0
    }
    assert live == {"['final_linear']['bias']", "['final_linear']['kernel']"}
    # stock attention with readable paths, a null-class row in the label table
    assert set(params["block_0"]["attn"]) == {"query", "key", "value", "out"}
    assert params["y_embed"]["embedding"].shape == (TINY_DIT.num_classes + 1, 32)


def _flow_cfg(npz, **train_kw):
    tc = dict(
        num_steps=40,
        batch_size=16,
        warmup_steps=2,
        learning_rate=2e-3,
        steps_per_call=20,
        ckpt_every=20,
    )
    return FlowExperimentConfig(
        TINY_DIT, FlowConfig(), DataConfig(str(npz)), TrainConfig(**{**tc, **train_kw})
    )


@pytest.fixture(scope="module")
def flow_run(tiny_npz, tmp_path_factory):
    """40 steps of `train`, interrupted (a Ctrl-C) after its first jitted call of
    20 steps and resumed; and the same 40 steps as two direct calls of the step
    function, the uninterrupted reference. All share one compiled step function
    (compiling dominates on CPU)."""
    import tmpq_jax.train.loop as loop

    real, compiled, interrupt = loop.make_flow_train_steps, {}, {"after": 1}

    def shared(model, flow, tc):
        fn = compiled.setdefault((model.config, flow, tc), real(model, flow, tc))
        calls = []

        def wrapped(*args):
            if len(calls) == interrupt["after"]:
                raise KeyboardInterrupt
            calls.append(1)
            return fn(*args)

        return wrapped

    cfg, workdir = _flow_cfg(tiny_npz), tmp_path_factory.mktemp("flow")
    loop.make_flow_train_steps = shared
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, workdir, progress=False)
        interrupt["after"] = None
        card = train(cfg, workdir, progress=False)
        # the reference: train's keys (split of the seed's key), no checkpoints
        k_init, k_train = jax.random.split(jax.random.key(cfg.train.seed))
        state = create_train_state(k_init, TINY_DIT, cfg.train)
        data = np.load(tiny_npz)
        images, labels = data["images"][..., None], data["labels"]
        ref = shared(DiT(TINY_DIT), cfg.flow, cfg.train)
        for _ in range(2):
            state, _ = ref(state, images, labels, k_train, 20)
    finally:
        loop.make_flow_train_steps = real
    assert len(compiled) == 1
    return card, workdir, state


def test_train_loop_resumes_exactly_and_exports(flow_run):
    card, workdir, reference = flow_run
    assert card["prediction"] == "velocity" and card["steps"] == 40
    cfg, params, card = load_dit(workdir / "model")
    jax.tree.map(np.testing.assert_array_equal, params, reference.ema_params)
    assert cfg == TINY_DIT and card["params"] == count_params(params)
    log = [json.loads(r) for r in (workdir / "train_log.jsonl").open()]
    assert [r["step"] for r in log] == [20, 40]


def test_flow_training_reduces_loss(flow_run, held_out):
    _, workdir, _ = flow_run
    before, _ = held_out(init_params(TINY_DIT, jax.random.key(0)))
    after, _ = held_out(load_dit(workdir / "model")[1])
    assert float(after) < 0.8 * float(before), (before, after)


def test_shipped_config_and_bad_configs(tiny_npz, tmp_path):
    cfg = experiment_config(load_config("configs/fmnist_dit.py"))
    assert isinstance(cfg, FlowExperimentConfig)
    assert cfg.model == DiTConfig() and cfg.flow == FlowConfig()
    assert type(experiment_config(load_config("configs/smoke.py"))).__name__ == (
        "ExperimentConfig"
    )
    with pytest.raises(UserError, match="not divisible by patch 3"):
        DiTConfig(patch=3).validate()
    with pytest.raises(UserError, match="t_sampling"):
        FlowConfig.from_dict({"t_sampling": "cosine"})
    # labels 0..1 in the data, but the model knows only class 0
    bad = _flow_cfg(tiny_npz)
    bad = dataclasses.replace(bad, model=dataclasses.replace(TINY_DIT, num_classes=1))
    np.savez(
        tmp_path / "two.npz",
        images=np.zeros((4, 16, 16), np.uint8),
        labels=np.array([0, 1, 0, 1]),
    )
    bad = dataclasses.replace(bad, data=DataConfig(str(tmp_path / "two.npz")))
    with pytest.raises(UserError, match="labels span 0..1 but the model has 1"):
        train(bad, tmp_path / "w", progress=False)


def test_nnx_dit_runs(key):
    model = DiTNNX(TINY_NNX_DIT, rngs=nnx.Rngs(0))
    x = jax.random.normal(key, (2, 8, 8, 1))
    out = nnx.jit(lambda m, x, t: m(x, t))(model, x, jnp.array([0.2, 0.9]))
    assert out.shape == x.shape and float(jnp.abs(out).mean()) > 0
    kinds = {type(m).__name__ for _, m in nnx.iter_graph(model)}
    assert {"Einsum", "Linear", "MultiHeadAttention"} <= kinds
