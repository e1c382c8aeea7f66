"""BLIP3-o training (dit/train.py): sharded step = unsharded, frozen backbone, resume, sampling."""

import os

import jax
import numpy as np
import pytest

from vlbpe_jax import parallel
from vlbpe_jax.dit import targets
from vlbpe_jax.dit import train
from compile_count import lowerings
from test_main import ROOT, load_config
import dit_helpers

CAPTIONS = dit_helpers.CAPTIONS


def _config(**dit):
  return dit_helpers.configure(load_config(os.path.join(ROOT, "configs", "tiny.py"), "tiny"),
                               **dit)


@pytest.fixture(scope="module")
def lm():
  return dit_helpers.lm()


_targets = dit_helpers.targets


def _setup(config, workdir, design, lm, mesh, x0):
  return train.setup(config, str(workdir), design, shape=x0.shape[1:],
                     stats=targets.stats_of(x0), backbone=dit_helpers.backbone(lm, mesh),
                     mesh=mesh)


def _batch(s, config, x0):
  ids, mask = s.backbone.encode([c[0] for c in CAPTIONS], config)
  return {"ids": ids, "mask": mask, "x0": (x0 - s.stats["mean"]) / s.stats["std"]}


def test_sharded_step_equals_unsharded(lm, tmp_path, design="fm"):
  config = _config()
  x0 = _targets()
  out = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = parallel.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)], devices)
    s = _setup(config, tmp_path, design, lm, mesh, x0)
    state = s.trainer.init(jax.random.key(1))
    key = jax.device_put(jax.random.key(2), s.trainer.repl)
    state, m = s.trainer.step(state, _batch(s, config, x0), key, s.backbone.params)
    out.append((jax.device_get(state["params"]), float(m["loss"])))
  assert len(jax.devices()) == 8
  assert out[0][1] == pytest.approx(out[1][1], rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               out[0][0], out[1][0])


def test_training_moves_queries_never_the_backbone_and_resumes_exactly(lm, tmp_path):
  # The DiT starts with zero-initialised output, adaLN and gates (and the LR warms up from 0):
  # gradients reach the queries from the third update on.
  config = _config(total_steps=5)
  x0 = _targets()
  mesh = parallel.mesh_from_config(config.mesh)
  s = _setup(config, tmp_path / "a", "fm", lm, mesh, x0)
  before = jax.tree.map(np.array, s.backbone.params)
  key_init, _ = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 0))  # as train
  init = jax.device_get(s.trainer.init(key_init)["params"])
  straight = train.train(config, s, CAPTIONS, x0)
  assert int(straight["step"]) == 5
  jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(s.backbone.params))
  after = jax.device_get(straight["params"])
  assert np.abs(after["queries"] - init["queries"]).max() > 0
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), after["net"], init["net"])
  assert max(jax.tree.leaves(moved)) > 0
  # Killed after step 2 and resumed: the same final state as the uninterrupted run.
  s_b = _setup(config, tmp_path / "b", "fm", lm, mesh, x0)
  train.train(config, s_b, CAPTIONS, x0, stop_at_step=2)
  resumed = train.train(config, s_b, CAPTIONS, x0)
  jax.tree.map(np.testing.assert_array_equal, after, jax.device_get(resumed["params"]))


def test_a_batch_that_does_not_split_over_the_data_shards_raises(lm, tmp_path):
  config = _config(data_shards=3)
  x0 = _targets()
  s = _setup(config, tmp_path, "fm", lm, parallel.mesh_from_config(config.mesh), x0)
  with pytest.raises(ValueError, match=r"dit.batch_size=8 does not split over 3 data shards "
                     r"\(dit.data_shards=3\)"):
    train.train(config, s, CAPTIONS, x0)


def test_generate_shapes_and_mse_is_deterministic(lm, tmp_path):
  config = _config()
  x0 = _targets()
  mesh = parallel.mesh_from_config(config.mesh)
  out = {}
  for design in ("fm", "mse"):
    s = _setup(config, tmp_path, design, lm, mesh, x0)
    params = s.trainer.init(jax.random.key(3))["params"]
    out[design] = train.generate(config, s, params, ["a red circle.", "a blue star."],
                                 jax.random.key(4), num_samples=3, steps=2)
    assert out[design].shape == (2, 3, 2, 2, 4)
  assert np.abs(out["mse"][:, 0] - out["mse"][:, 2]).max() == 0.0
  assert np.abs(out["fm"][:, 0] - out["fm"][:, 1]).max() > 1e-3
  with pytest.raises(ValueError, match="max_len=24"):
    train.generate(config, s, params, ["a caption much longer than twenty-four ids"],
                   jax.random.key(4), num_samples=1, steps=2)


def test_bad_design_and_config_raise():
  with pytest.raises(ValueError, match="design='gan'"):
    train.check_config(_config(), "gan")
  with pytest.raises(ValueError, match="num_queries"):
    train.check_config(_config(num_queries=5), "mse")
  with pytest.raises(ValueError, match="cfg_dropout"):
    train.check_config(_config(cfg_dropout=1.0), "fm")


def test_pixel_decoder_decode_compiles_once(tmp_path):
  """The stage decodes the ceiling and every design's samples: repeated calls of
  `decoder.decode` reuse one compiled program (a fresh jax.jit per call compiled each time)."""
  from vlbpe_jax.dit import decoder  # pylint: disable=g-import-not-at-top
  config = _config()
  config.data.resolution, config.clip.grid = 16, 4  # 4x4 feature grids -> 16x16 pixels
  config.dit.decoder.ch_mult = (1,)
  feats = np.random.default_rng(0).normal(size=(6, 4, 4, 8)).astype(np.float32)
  s = decoder.setup(config, str(tmp_path), targets.stats_of(feats),
                    mesh=parallel.mesh_from_config(config.mesh))
  params = s.trainer.init(jax.random.key(0))["params"]
  first = decoder.decode(s, params, feats, batch_size=4)
  with lowerings() as lowered:
    again = decoder.decode(s, params, feats, batch_size=4)
  assert not lowered, f"{len(lowered)} programs lowered again"
  assert first.shape == (6, 16, 16, 3) and first.dtype == np.uint8
  np.testing.assert_array_equal(first, again)
