"""Sharded runs equal single-device runs on 8 fake CPU devices (set in the root conftest)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrid_video import sharding as sharding_lib
from hybrid_video import train as train_lib
from hybrid_video.checkpoint import abstract_like
from hybrid_video.nn.model import CausalDiT
from hybrid_video.streaming import StreamingSampler
from tests.helpers import open_memory_gates, perturbed, rel_err, tiny_model_config
from tests.test_main import smoke_config

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "param_specs_tiny.json")


@pytest.fixture(autouse=True)
def _eight_devices():
  """The root conftest sets 8 fake CPU devices before jax is imported; fail, never skip, when a
  run bypasses it (e.g. a preset XLA_FLAGS or a 1-GPU JAX_PLATFORMS)."""
  assert jax.device_count() >= 8, (
      f"sharding tests need 8 devices, found {jax.device_count()}: run on CPU with "
      "XLA_FLAGS=--xla_force_host_platform_device_count=8 (the root conftest sets it)")


def mesh_cfg(**sizes):
  cfg = smoke_config("/unused").mesh
  for name in sharding_lib.MESH_AXES:
    cfg[name] = sizes.get(name, 1)
  return cfg


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def _trainer(data_dir, workdir, mesh, seed=0, **model):
  cfg = smoke_config(data_dir, batch_size=8)
  cfg.model.hybrid.ratio = 0.5
  cfg.model.update(model)
  cfg.seed = seed
  for name in sharding_lib.MESH_AXES:
    cfg.mesh[name] = mesh.get(name, 1)
  return train_lib.Trainer(cfg, str(workdir))


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.slow
@pytest.mark.parametrize("mesh,model", [(dict(data=2, fsdp=2, tensor=2), {}), (dict(fsdp=8), {}),
                                        (dict(fsdp=8), dict(scan_layers=True, remat=True,
                                                            num_layers=4))],
                         ids=["data2_fsdp2_tensor2", "fsdp8", "fsdp8_scan_layers_remat"])
def test_sharded_train_step_equals_single_device(tmp_path, data_dir, mesh, model):
  """The sharded step equals the single-device one; with model.scan_layers and remat (the Wan
  configs' training setting) it still equals the plain unrolled single-device step."""
  shape = {k: v for k, v in model.items() if k == "num_layers"}  # 4: two runs of two blocks
  single = _trainer(data_dir, tmp_path / "single", dict(data=1), **shape)
  single_devices = single.state["params"]
  sharded = _trainer(data_dir, tmp_path / "sharded", mesh, **model)
  batch = next(single.data.iterator(0))
  # The state is born sharded: some parameter is split over devices.
  assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
             for x in jax.tree.leaves(sharded.state["params"]))
  for a, b in zip(_leaves(single_devices), _leaves(sharded.state["params"])):
    np.testing.assert_array_equal(a, b)
  with jax.transfer_guard("disallow"):
    m1 = single.step(batch)
    m2 = sharded.step(batch)
  assert rel_err(m2["loss"], m1["loss"]) <= 1e-5
  for a, b in zip(_leaves(single.state["params"]), _leaves(sharded.state["params"])):
    assert rel_err(b, a) <= 1e-5


def test_golden_param_specs():
  cfg = tiny_model_config(0.5)
  model = nnx.eval_shape(lambda: CausalDiT(cfg, rngs=nnx.Rngs(0)))
  mesh = sharding_lib.make_mesh(mesh_cfg(data=2, fsdp=2, tensor=2))
  specs = sharding_lib.param_specs(nnx.state(model, nnx.Param), dict(sharding_lib.DEFAULT_RULES),
                                   mesh)
  got = sharding_lib.describe_specs(specs)
  if os.environ.get("UPDATE_GOLDEN"):
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    with open(GOLDEN, "w") as f:
      json.dump(got, f, indent=1, sort_keys=True)
  with open(GOLDEN) as f:
    expected = json.load(f)
  assert got == expected, "parameter sharding changed; rerun with UPDATE_GOLDEN=1 if intended"


def test_streaming_on_sharded_mesh_equals_single_device():
  cfg = tiny_model_config(0.5)
  model = open_memory_gates(perturbed(CausalDiT(cfg, rngs=nnx.Rngs(0)), seed=1))
  scfg = smoke_config("/unused").sampler
  scfg.cache_chunks = 2
  outputs = {}
  for name, sizes in {"single": dict(data=1), "sharded": dict(data=2, tensor=2, context=2)}.items():
    mesh = sharding_lib.make_mesh(mesh_cfg(**sizes), devices=jax.devices()[:np.prod(
        list(sizes.values()))])
    sampler = StreamingSampler(model, scfg, batch=2, frame_hw=(16, 16), mesh=mesh)
    frames = []
    carry = sampler.init_carry()
    key, context = sampler.prepare(0, jnp.array([[1], [2]]))
    with jax.transfer_guard("disallow"):  # no host transfer inside the sampler steps
      for _ in range(4):
        carry, f = sampler.step_fn(carry)(sampler.state, carry, key, context)
        frames.append(f)
    outputs[name] = np.concatenate([np.asarray(f) for f in frames], axis=1)
    if name == "sharded":
      state = next(lc["state"] for lc in carry["layers"] if "state" in lc)
      assert state.sharding.spec[:2] == (("data",), "tensor") or \
          state.sharding.spec[:2] == ("data", "tensor")
      cache = next(lc["k"] for lc in carry["layers"] if "k" in lc)
      assert cache.sharding.spec[1] == "context"
  assert rel_err(outputs["sharded"], outputs["single"]) <= 1e-5


@pytest.mark.slow
def test_checkpoint_restores_onto_another_mesh(tmp_path, data_dir):
  trainer = _trainer(data_dir, tmp_path / "w", dict(fsdp=8))
  batch = next(trainer.data.iterator(0))
  trainer.step(batch)
  trainer.checkpointer.save(1, trainer.state, trainer.config, force=True)
  trainer.checkpointer.wait()
  other = _trainer(data_dir, tmp_path / "w", dict(data=2, tensor=4))
  restored, step = other.checkpointer.restore(abstract_like(other.state), 1)
  assert step == 1
  for a, b in zip(jax.tree.leaves(trainer.state["params"]), jax.tree.leaves(restored["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  spec = restored["params"]["blocks"][0]["ffn"]["fc1"]["kernel"].sharding.spec
  assert "tensor" in str(spec)


def test_mesh_shape_errors():
  assert sharding_lib.mesh_shape(mesh_cfg(data=-1, tensor=2), 8) == (4, 1, 2, 1)
  assert sharding_lib.mesh_shape(mesh_cfg(data=2), 8) == (2, 1, 1, 1)  # uses 2 of 8
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding_lib.mesh_shape(mesh_cfg(data=4, tensor=4), 8)
  with pytest.raises(ValueError, match="at most one"):
    sharding_lib.mesh_shape(mesh_cfg(data=-1, fsdp=-1), 8)


@pytest.mark.slow
def test_compile_mode_prints_memory_analysis(tmp_path, capsys):
  from hybrid_video.modes.compile import compile_main  # pylint: disable=g-import-not-at-top
  cfg = smoke_config(tmp_path / "unused")
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
  cfg.train.batch_size = 8
  results = compile_main(cfg, str(tmp_path))
  out = capsys.readouterr().out
  for field in ("argument_size_in_bytes", "temp_size_in_bytes", "flops", "matmul flops", "fits: "):
    assert field in out
  assert results["train"]["temp_size_in_bytes"] > 0
  assert results["sample"]["argument_size_in_bytes"] > 0
  assert os.path.exists(tmp_path / "compile_analysis.json")


def test_label_adaln_parameters_have_sharding_rules():
  cfg = tiny_model_config(0.5)
  cfg.label_adaln = True
  model = nnx.eval_shape(lambda: CausalDiT(cfg, rngs=nnx.Rngs(0)))
  mesh = sharding_lib.make_mesh(mesh_cfg(data=2, fsdp=2, tensor=2))
  specs = sharding_lib.describe_specs(sharding_lib.param_specs(
      nnx.state(model, nnx.Param), dict(sharding_lib.DEFAULT_RULES), mesh))
  got = {k: v for k, v in specs.items() if "label_to_time" in k}
  assert len(got) == 2, specs.keys()
  kernel = next(v for k, v in got.items() if k.endswith("kernel"))
  assert "fsdp" in str(kernel), got  # sharded over the embedding like time_embed/proj
