"""The supernet on the tiny UNet and on a second, test-only architecture."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmpq_jax.models.unet import UNet
from tmpq_jax.quant import QuantBits, build_registry, quantized_apply, unet_registry

pytestmark = pytest.mark.filterwarnings(  # AQT 0.9.0 calls jnp.promote_types on arrays
    "ignore:Implicit conversion of an array to a dtype:DeprecationWarning"
)
CANDIDATES = (8, 7, 6, 5, 4, 3, 2)


def random_population(seed, size, n_layers, candidates=(8, 7, 6, 5)):
    rng = np.random.default_rng(seed)
    pick = lambda: jnp.asarray(rng.choice(candidates, (size, n_layers)), jnp.int32)
    return QuantBits(w_bits=pick(), a_bits=pick())


def take(bits, i):
    return jax.tree.map(lambda a: a[i], bits)


@pytest.fixture(scope="module")
def unet(tiny_cfg, tiny_params):
    """Tiny UNet, its registry, a batch, and ONE compiled function evaluating a
    population of 4 genomes (bits traced): every UNet test below goes through it."""
    model, reg = UNet(tiny_cfg), unet_registry(tiny_cfg)
    x = jax.random.normal(jax.random.key(5), (2, 16, 16, 1))
    t = jnp.array([20, 700])
    v = {"params": tiny_params}
    f = lambda b: quantized_apply(
        model, v, x, t, bits=b, registry=reg, candidates=CANDIDATES
    )
    return dict(model=model, reg=reg, x=x, t=t, v=v, pop=jax.jit(jax.vmap(f)))


def stack(genomes):
    return jax.tree.map(lambda *a: jnp.stack(a), *genomes)


def test_population_compiles_once_and_members_are_independent(unet):
    reg, pop = unet["reg"], unet["pop"]
    bits = random_population(0, 4, len(reg))
    out = pop(bits)
    for seed in (1, 2):
        pop(random_population(seed, 4, len(reg)))
    assert pop._cache_size() == 1
    flat = np.asarray(out).reshape(4, -1)
    dists = np.abs(flat[:, None] - flat[None]).max(-1)
    assert (dists[~np.eye(4, dtype=bool)] > 1e-3).all()  # 4 distinct outputs
    # Member i's output is bit-identical whatever the other members are: alone in
    # a population of copies of itself, or moved to another slot.
    rolled = pop(jax.tree.map(lambda a: jnp.roll(a, 1, axis=0), bits))
    for i in range(4):
        copies = pop(stack([take(bits, i)] * 4))
        np.testing.assert_array_equal(copies[i], out[i])
        np.testing.assert_array_equal(rolled[(i + 1) % 4], out[i])


def test_error_shrinks_with_bits_8_close_to_float(unet):
    reg = unet["reg"]
    ref = jax.jit(unet["model"].apply)(unet["v"], unet["x"], unet["t"])
    out = unet["pop"](stack([QuantBits.uniform(reg, b, b) for b in (8, 6, 4, 2)]))
    rel = [float(jnp.linalg.norm(o - ref) / jnp.linalg.norm(ref)) for o in out]
    assert rel[0] < 0.1, rel
    assert rel[0] < rel[1] < rel[2] < rel[3], rel
    assert rel[3] > 10 * rel[0], rel


def test_every_gene_is_live_except_the_softmax_operand(unet):
    """Dropping one gene to 2 bits changes the output, except a_bits of `av` (the
    pinned 8-bit softmax output)."""
    reg = unet["reg"]
    base = QuantBits.uniform(reg, 8, 8)
    cases = [
        (name, field)
        for name in ["conv_in", "temb0", "mid_attn/qk", "mid_attn/av", "mid_attn/proj"]
        for field in ("w_bits", "a_bits")
    ]
    genomes = [base]
    for name, field in cases:
        i = reg.index(name)
        genomes.append(base.replace(**{field: getattr(base, field).at[i].set(2)}))
    genomes += [base] * (-len(genomes) % 4)  # whole populations of 4
    outs = [unet["pop"](stack(genomes[k : k + 4])) for k in range(0, len(genomes), 4)]
    outs = jnp.concatenate(outs)
    for (name, field), out in zip(cases, outs[1:], strict=False):
        changed = float(jnp.abs(out - outs[0]).max()) > 0
        inert = name.endswith("/av") and field == "a_bits"
        assert changed != inert, (name, field)


# --- a second architecture, defined only here ------------------------------------------


class Block(nn.Module):  # submodules from setup(), circular padding, depthwise conv
    features: int

    def setup(self):
        self.conv = nn.Conv(self.features, (3, 3), padding="CIRCULAR")
        self.dw = nn.Conv(
            self.features, (3, 3), feature_group_count=self.features, use_bias=False
        )

    def __call__(self, x):
        return nn.relu(self.dw(nn.relu(self.conv(x))))


class Wide(nn.Dense):  # a Dense subclass with its own __call__
    def __call__(self, x):
        return super().__call__(x) * 0.5


class ToyNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = Block(4, name="block")(x)
        h = nn.Conv(8, (3, 3), strides=(2, 2), name="down")(h)
        h = h.reshape(h.shape[0], -1)
        h = nn.relu(Wide(16, name="fc")(h))
        return nn.Dense(3, use_bias=False, name="head")(h)


TOY_NAMES = ("block/conv", "block/dw", "down", "fc", "head")


@pytest.fixture(scope="module")
def toy():
    x = jax.random.normal(jax.random.key(0), (3, 6, 6, 2))
    v = ToyNet().init(jax.random.key(1), x)
    reg = build_registry(ToyNet(), v, x)
    f = lambda b: quantized_apply(ToyNet(), v, x, bits=b, registry=reg)
    return dict(x=x, v=v, reg=reg, single=jax.jit(f), pop=jax.jit(jax.vmap(f)))


def test_second_architecture_registry_lists_exactly_its_layers(toy):
    reg = toy["reg"]
    assert reg.names == TOY_NAMES
    assert reg.kinds == ("conv", "conv", "conv", "dense", "dense")
    # hand count at 6x6x2 input: out elements x contracted kernel elements
    assert list(reg.macs) == [36 * 4 * 18, 36 * 4 * 9, 9 * 8 * 36, 72 * 16, 16 * 3]
    assert list(reg.params) == [72, 36, 288, 1152, 48]


def test_second_architecture_quantized_everywhere(toy):
    reg = toy["reg"]
    ref = ToyNet().apply(toy["v"], toy["x"])
    base = QuantBits.uniform(reg, 8, 8)
    out8 = toy["single"](base)
    assert float(jnp.abs(out8 - ref).max()) < 0.05 * float(jnp.abs(ref).max())
    for i, name in enumerate(TOY_NAMES):
        low = base.replace(w_bits=base.w_bits.at[i].set(5))
        assert float(jnp.abs(toy["single"](low) - out8).max()) > 0, name
    pop = random_population(1, 4, len(reg))
    out = toy["pop"](pop)
    assert len({np.asarray(o).tobytes() for o in out}) == 4
    for i in range(4):  # each member equals its genome run alone (separate compile)
        np.testing.assert_array_equal(out[i], toy["single"](take(pop, i)))
