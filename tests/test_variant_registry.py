"""A variant defined in user code works by name wherever a built-in one does."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import hyperconn
from hyperconn import ConfigError, HyperConnection
from hyperconn.models import GPT, ConnectionConfig, GPTConfig
from hyperconn.variants import unregister_variant

USER_VARIANT = '''
import dataclasses
import torch
import hyperconn
from hyperconn import ConfigError
from hyperconn.variants import Options


@dataclasses.dataclass(frozen=True)
class BlendOptions(Options):
    blend: float = 0.25

    def check_blend(self, value):
        if not 0.0 <= value <= 1.0:
            raise ConfigError("blend", f"expected a number in [0, 1], got {value!r}")


class Blend(hyperconn.Variant):
    """H_res = (1 - b) I + b 11ᵀ/n: doubly stochastic, one fixed option."""

    name = "user-blend"
    Options = BlendOptions

    def map_res(self, raw_res, state):
        n = self.streams
        eye = torch.eye(n, dtype=raw_res.dtype, device=raw_res.device)
        b = self.options.blend
        return ((1 - b) * eye + b / n) + 0.0 * raw_res

    @classmethod
    def describe_options(cls, options):
        return [f"blend={options.blend:g}"]
'''


@pytest.fixture
def user_variant():
    namespace = {}
    exec(compile(USER_VARIANT, "user_variant", "exec"), namespace)
    yield namespace["Blend"]
    unregister_variant("user-blend")


def test_subclassing_registers_and_the_layer_uses_it(user_variant):
    assert "user-blend" in hyperconn.VARIANTS and hyperconn.get_variant("user-blend") is user_variant
    layer = HyperConnection(8, 4, nn.Linear(8, 8), variant="user-blend", blend=0.5)
    x = torch.randn(2, 3, 4, 8)
    h_res = layer.coefficients(x)[2]
    torch.testing.assert_close(h_res[0, 0], 0.5 * torch.eye(4) + 0.125)
    assert layer(x).shape == x.shape
    with pytest.raises(ConfigError, match="^blend: expected a number in"):
        HyperConnection(8, 4, nn.Linear(8, 8), variant="user-blend", blend=2.0)
    # another variant's option is accepted and ignored by a built-in (one config, all variants)
    HyperConnection(8, 4, nn.Linear(8, 8), variant="mhc", blend=0.5)


def test_unknown_variant_error_lists_the_registry(user_variant):
    with pytest.raises(ConfigError, match="user-blend") as info:
        HyperConnection(8, 4, nn.Identity(), variant="nope")
    assert info.value.field == "variant"
    unregister_variant("user-blend")
    assert "user-blend" not in hyperconn.VARIANTS
    hyperconn.register_variant(user_variant)  # the decorator form, same class


def test_model_config_and_description(user_variant):
    cfg = GPTConfig(n_layer=1, n_embd=16, n_head=2, seq_len=16,
                    connection={"variant": "user-blend", "streams": 2, "options": {"blend": 0.75}})
    assert cfg.connection.describe() == "user-blend n=2 dynamic blend=0.75"
    model = GPT(cfg)
    assert all(c.mixer.options.blend == 0.75 for c in model.connections())
    assert model(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, 256)
    with pytest.raises(ConfigError) as info:
        GPTConfig(connection={"variant": "user-blend", "options": {"blend": -1.0}})
    assert info.value.field == "connection.blend"
    with pytest.raises(ConfigError, match="options.sinkhorn_iters"):
        ConnectionConfig(variant="mhc", options={"sinkhorn_iters": 3})


def test_trains_in_the_lab(user_variant, tmp_path):
    from hyperconn.train import TrainConfig, train

    cfg = TrainConfig.from_dict({
        "task": "kv", "steps": 3, "batch_size": 4, "eval_every": 3, "eval_batches": 1, "quiet": True,
        "out_dir": str(tmp_path / "run"), "device": "cpu",
        "model": {"n_layer": 1, "n_embd": 16, "n_head": 2, "seq_len": 64,
                  "connection": {"variant": "user-blend", "streams": 2, "options": {"blend": 0.5}}}})
    summary = train(cfg)
    assert summary["status"] == "finished" and summary["variant"] == "user-blend"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["connection"]["options"] == \
        {"blend": 0.5}


def test_user_variant_by_name_in_the_cli_train_compare_and_report(tmp_path):
    """One user module, no library edit: train, compare and report use the variant by name."""
    (tmp_path / "my_variants.py").write_text(USER_VARIANT)
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    env.pop("HYPERCONN_IMPORT", None)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "hyperconn.cli", "--import", "my_variants", *args],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    run = tmp_path / "train"
    proc = cli("train", "--model.connection.variant", "user-blend", "--model.connection.streams", "2",
               "--model.n-layer", "1", "--model.n-embd", "16", "--model.n-head", "2", "--model.seq-len", "32",
               "--steps", "2", "--batch-size", "2", "--eval-every", "2", "--eval-batches", "1",
               "--device", "cpu", "--quiet", "--out-dir", str(run))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((run / "summary.json").read_text())["variant"] == "user-blend"

    out = tmp_path / "cmp"
    proc = cli("compare", "--preset", "smoke", "--variants", "residual", "user-blend", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "kv" / "user-blend" / "seed0" / "summary.json").exists()
    assert "user-blend" in (out / "summary.md").read_text()

    proc = cli("report", str(out), "--out", str(tmp_path / "report"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "user-blend" in next((tmp_path / "report").glob("*.md")).read_text()

    proc = cli("compare", "--preset", "smoke", "--variants", "residual", "no-such-variant", "--out",
               str(tmp_path / "bad"))
    assert proc.returncode == 2 and "--variants" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_registry_edge_cases(user_variant):
    hyperconn.register_variant(user_variant, "user-blend-2")          # renamed: one name per class
    assert "user-blend-2" in hyperconn.VARIANTS and "user-blend" not in hyperconn.VARIANTS
    hyperconn.register_variant(user_variant, "user-blend")            # back, for the fixture's cleanup
    with pytest.raises(ValueError, match="^streams"):
        hyperconn.variants.make_variant("kromhc", 0)                  # used to loop forever

    class Flat(hyperconn.Variant):                                     # res_logit_shape without static_init
        name = "user-flat"

        @property
        def res_logit_shape(self):
            return (self.streams,)

        def map_res(self, raw_res, state):
            return torch.eye(self.streams).expand(*raw_res.shape[:-1], -1, -1)
    try:
        with pytest.raises(TypeError, match="override static_init"):
            HyperConnection(8, 4, nn.Identity(), variant="user-flat")
    finally:
        unregister_variant("user-flat")
    with pytest.raises(ConfigError, match="options.kernels"):
        ConnectionConfig(variant="mhc", options={"kernels": "torch"})
