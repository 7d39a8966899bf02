"""`--model FILE.py:factory`: a user's own model through the command line, and
the one-line refusals around it."""

import json
import textwrap

import pytest

from tmpq_jax.cli import main

FACTORY = textwrap.dedent(
    """
    import jax
    from flax import nnx
    import byo_models as bm

    def linen_dit():
        model = bm.LinenDiT()
        x, t = bm.inputs(1)
        return model, model.init(jax.random.key(0), x, t)["params"], {
            "image_size": bm.SIZE, "channels": 1}

    def nnx_dit():
        return bm.NNXDiT(nnx.Rngs(0)), None, {"image_size": bm.SIZE, "channels": 1}

    def wrong():
        return {"model": 1}

    def not_flax():
        return object(), {}, {"image_size": 16, "channels": 1}

    def wrong_shape():
        model = bm.LinenDiT()
        x, t = bm.inputs(1)
        return model, model.init(jax.random.key(0), x, t)["params"], {
            "image_size": 20, "channels": 1}

    def flow():
        model = bm.LinenDiT()
        x, t = bm.inputs(1)
        return model, model.init(jax.random.key(0), x, t)["params"], {
            "image_size": bm.SIZE, "channels": 1, "prediction": "velocity"}
    """
)


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "my_model.py"
    path.write_text(FACTORY)
    return path


def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


@pytest.mark.parametrize("fn", ["linen_dit", "nnx_dit"])
def test_layers_lists_every_op_of_a_user_model(factory, capsys, fn):
    assert main(["layers", "--model", f"{factory}:{fn}"]) == 0
    out = capsys.readouterr().out
    assert "coverage: 100.00%" in out
    assert ("mixer/op_1" if fn == "linen_dit" else "attn/op_1") in out


def test_bad_model_specs_are_one_line(factory, capsys, tmp_path):
    _one_line_error(
        capsys, ["layers", "--model", f"{tmp_path}/no.py:f"], "does not exist"
    )
    _one_line_error(capsys, ["layers", "--model", f"{factory}:nope"], "no factory")
    _one_line_error(capsys, ["layers", "--model", f"{factory}:wrong"], "returned dict")
    _one_line_error(capsys, ["layers", "--model", f"{factory}:not_flax"], "not a Flax")
    _one_line_error(capsys, ["layers", "--model", "nocolon"], "FILE.py:factory")
    _one_line_error(capsys, ["layers", "--model", f"{factory}:flow"], "velocity-pred")
    argv = ["layers", "--model", f"{factory}:wrong_shape"]
    _one_line_error(capsys, argv, "does not run as model(x, t)")
    argv = ["layers", "--model", f"{factory}:linen_dit", "--checkpoint", "x"]
    _one_line_error(capsys, argv, "not both")


def test_a_genome_names_its_model_and_is_refused_on_another(factory, capsys, tmp_path):
    from tmpq_jax.genome_file import genome_to_dict, write_genome
    from tmpq_jax.quant import QuantBits
    from tmpq_jax.quant.calibration import model_fingerprint
    from tmpq_jax.user_model import load_user_model

    spec = f"{factory}:linen_dit"
    calib = tmp_path / "calib"
    argv = ["calibrate", "--model", spec, "--out", str(calib), "--no-progress"]
    assert main([*argv, "--timesteps", "2", "--samples", "2"]) == 0
    lm = load_user_model(spec)
    reg = lm.layer_registry()
    genome = genome_to_dict(
        [0, 500],
        QuantBits.uniform(reg, 6, 8),
        reg,
        (8, 7, 6, 5),
        calibration=str(calib),
        model_fingerprint=model_fingerprint(lm.card),
        model=lm.source,
    )
    path = write_genome(tmp_path / "g.json", genome)
    assert json.loads(path.read_text())["model"] == "factory:" + spec
    # Found through the genome alone, served from int8 weights.
    out = tmp_path / "s.png"
    assert main(["sample", "--genome", str(path), "--out", str(out), "--num", "2",
                 "--no-progress"]) == 0  # fmt: skip
    assert out.is_file()
    # The shipped model is another model: refused by fingerprint, in one line.
    argv = ["sample", "--genome", str(path), "--out", str(out), "--checkpoint"]
    _one_line_error(capsys, [*argv, "checkpoints/fmnist_unet"], "searched on model")
