"""The text LM's stages in the pipeline: `text` (stage 0) and `text_icl` (V2L's frozen LM, stage 0
continued on lm.text_phases), each keyed by the fields it reads and nothing else."""

import os

import jax
import numpy as np
import pytest

from vlbpe_jax import checkpoint
from vlbpe_jax import parallel
from vlbpe_jax import train
from vlbpe_jax.eval import report
from vlbpe_jax.lm import train as lm_train
from vlbpe_jax.v2l import train as v2l_train
from test_main import ROOT, load_config


def _config(**lm):
  c = load_config(os.path.join(ROOT, "configs", "tiny.py"), "tiny")
  c.stages = "data,text,text_icl"
  c.lm.text_phases = ((2, ("denoise",), 1e-3),)
  for k, v in lm.items():
    c.lm[k] = v
  return c


def _params(config, workdir):
  mesh = parallel.mesh_from_config(config.mesh, batch_size=config.lm.batch_size)
  return jax.device_get(v2l_train.load_text_lm(config, workdir, mesh).params)


@pytest.mark.slow
def test_text_icl_continues_stage_0_and_only_its_own_fields_retrain_it(tmp_path):
  w = str(tmp_path)
  config = _config()
  train.train_and_evaluate(config, w)
  metrics = report.read_metrics(w)
  steps = int(config.lm.text_steps)
  assert metrics["text.steps"] == steps and metrics["text_icl.steps"] == 2
  ckpt = checkpoint.Checkpointer(os.path.join(lm_train.icl_dir(w), "ckpt"))
  assert ckpt.latest_step() == steps + 2  # stage 0's steps, then the phase's
  ckpt.close()
  icl = _params(config, w)  # V2L's frozen LM is the continuation, not stage 0
  no_phases = _config(text_phases=())
  stage0 = _params(no_phases, w)
  assert any(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), icl, stage0)))

  # Being-VL's and V2L's own fields leave both trained runs as they are.
  other = _config(stage_steps=(3, 3, 3))
  other.v2l.lr = config.v2l.lr * 2
  for name in ("text", "text_icl"):
    assert train._status(other, w, name)[0] == "done", name  # pylint: disable=protected-access

  # Its phases are its own: the rerun is refused naming them; asked for, only it retrains.
  text_manifest = (tmp_path / "manifests" / "text.json").read_text()
  longer = _config(text_phases=((3, ("denoise",), 1e-3),))
  with pytest.raises(ValueError, match="stage 'text_icl'") as e:
    train.train_and_evaluate(longer, w)
  assert "config lm.text_phases:" in str(e.value) and "--config.recompute=text_icl" in str(e.value)
  longer.recompute = "text_icl"
  train.train_and_evaluate(longer, w)
  assert report.read_metrics(w)["text_icl.steps"] == 3
  assert (tmp_path / "manifests" / "text.json").read_text() == text_manifest
