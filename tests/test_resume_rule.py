"""The pipeline's resume rule (vlbpe_jax/train.py, manifest.py) on three toy stages.

a (reads config a.*) -> b (a training stage: reads a's output, config b.*) -> c (reads b).
Each writes one output file derived from its inputs and adds its report section, so what a
rerun reuses, recomputes or refuses can be checked without jax.
"""

import json
import os

import ml_collections
import pytest

from vlbpe_jax import fileio
from vlbpe_jax import manifest
from vlbpe_jax import train
from vlbpe_jax.eval import report


def _read(workdir, rel):
  with open(os.path.join(workdir, rel)) as f:
    return f.read()


def _toy_stage(name, upstream, calls):
  def run(config, workdir):
    calls.append(name)
    value = f"{name}:{config[name].value}"
    if upstream:
      value += "|" + _read(workdir, f"{upstream}/out.txt")
    fileio.write_text(os.path.join(workdir, name, "out.txt"), value)
    metrics = {f"{name}.value": value}
    report.add_section(workdir, key=name, title=name, order=ord(name), html=value,
                       metrics=metrics)
    return metrics
  return run


@pytest.fixture(params=[1, 2], ids=["one_at_a_time", "on_threads"])
def toy(monkeypatch, request):
  # Every rule holds with the stages run one at a time and on threads (`run_stages`).
  monkeypatch.setattr(train.parallel, "stage_workers", lambda config: request.param)
  calls = []
  stages = {
      "a": train.Stage(_toy_stage("a", None, calls), ("a",), outputs=("a/out.txt",),
                       owns=("a",)),
      "b": train.Stage(_toy_stage("b", "a", calls), ("b",), reads=("a",),
                       outputs=("b/out.txt",), owns=("b",), trains=True),
      "c": train.Stage(_toy_stage("c", "b", calls), ("c",), reads=("b",),
                       outputs=("c/out.txt",), owns=("c",)),
  }
  monkeypatch.setattr(train, "STAGES", stages)
  return calls


def _config(a=1, b=1, c=1, stages="a,b,c", recompute=""):
  return ml_collections.ConfigDict(dict(a=dict(value=a, shown=0, progress=True),
                                        b=dict(value=b), c=dict(value=c), stages=stages,
                                        recompute=recompute))


def _metrics(workdir):
  return {k: v for k, v in report.read_metrics(workdir).items() if not k.startswith("time_s.")}


def test_rerun_skips_every_stage_and_keeps_the_metrics(toy, tmp_path):
  w = str(tmp_path)
  train.train_and_evaluate(_config(), w)
  first = _metrics(w)
  assert toy == ["a", "b", "c"]
  assert first["c.value"] == "c:1|b:1|a:1"
  train.train_and_evaluate(_config(), w)
  assert toy == ["a", "b", "c"]  # nothing ran again
  assert _metrics(w) == first


def test_a_changed_stage_recomputes_itself_and_downstream_only(toy, tmp_path):
  w = str(tmp_path)
  train.train_and_evaluate(_config(), w)
  toy.clear()
  train.train_and_evaluate(_config(c=2), w)
  assert toy == ["c"]
  fresh = str(tmp_path / "fresh")
  train.train_and_evaluate(_config(c=2), fresh)
  assert _metrics(w) == _metrics(fresh)


def test_a_cosmetic_field_changes_no_key(toy, tmp_path):
  w = str(tmp_path)
  train.train_and_evaluate(_config(), w)
  toy.clear()
  config = _config()
  config.a.progress = False  # manifest.COSMETIC: shown, never a result
  train.train_and_evaluate(config, w)
  assert toy == []


def test_a_training_stage_is_refused_with_the_change_and_the_command(toy, tmp_path):
  w = str(tmp_path)
  train.train_and_evaluate(_config(), w)
  toy.clear()
  before = _metrics(w)
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(_config(a=2), w)  # b's key holds a's config: refused up front
  assert "stage 'b'" in str(e.value) and "a.value: 1 -> 2" in str(e.value)
  assert "--config.recompute=b" in str(e.value)
  assert toy == [] and _metrics(w) == before  # nothing written before the refusal
  train.train_and_evaluate(_config(a=2, recompute="b"), w)
  assert toy == ["a", "b", "c"]
  fresh = str(tmp_path / "fresh")
  train.train_and_evaluate(_config(a=2), fresh)
  assert _metrics(w) == _metrics(fresh)


def test_recompute_names_a_stage_and_everything_after_it():
  config = _config(recompute="vq")
  assert train.recompute_allowed(config) == {"vq", "bpe", "lm", "clip", "pixel_decoder",
                                             "text_icl", "dit", "v2l"}
  assert train.recompute_allowed(_config(recompute="all")) == set(train.STAGES)
  with pytest.raises(ValueError, match="config.recompute"):
    train.recompute_allowed(_config(recompute="nope"))


def test_changed_input_content_is_seen_through_the_digest(toy, tmp_path):
  w = str(tmp_path)
  train.train_and_evaluate(_config(), w)
  toy.clear()
  # a's output edited by hand: a is recomputed (non-training); then b's input digest matches
  # again (same content), so nothing else runs.
  fileio.write_text(os.path.join(w, "a", "out.txt"), "edited")
  train.train_and_evaluate(_config(), w)
  assert toy == ["a"]
  # c's output torn: c is recomputed from b, whose output is intact.
  with open(os.path.join(w, "c", "out.txt"), "w") as f:
    f.write("c:")
  toy.clear()
  train.train_and_evaluate(_config(), w)
  assert toy == ["c"] and _read(w, "c/out.txt") == "c:1|b:1|a:1"


def test_an_interrupted_training_stage_resumes_and_times_add_up(toy, tmp_path, monkeypatch):
  w = str(tmp_path)
  run_b = train.STAGES["b"].run

  def crash(config, workdir):
    raise KeyboardInterrupt("killed")
  monkeypatch.setitem(train.STAGES, "b", train.STAGES["b"].__class__(
      **{**train.STAGES["b"].__dict__, "run": crash}))
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(_config(), w)
  m = manifest.load(w, "b")
  assert m["status"] == "running" and m["seconds"] >= 0
  assert "b" not in report.read_metrics(w) and report.section_metrics(w, "c") is None
  monkeypatch.setitem(train.STAGES, "b", train.STAGES["b"].__class__(
      **{**train.STAGES["b"].__dict__, "run": run_b}))
  toy.clear()
  train.train_and_evaluate(_config(), w)
  assert toy == ["b", "c"]  # a was done; b resumed (its folder kept), c ran
  assert manifest.load(w, "b")["status"] == "done"


def test_a_missing_report_section_reruns_the_stage_on_its_outputs(toy, tmp_path, monkeypatch):
  """A done stage whose report section is gone runs again on its intact outputs instead of
  rebuilding them. Its outputs' bytes may differ from build to build with the same content
  (TFDS serialises tf.Example maps in hash order), which would make every stage after it read
  other inputs: a training one refused, the rest recomputed."""
  w = str(tmp_path)
  builds = []

  def run_a(config, workdir):  # a new nonce per build; an existing output is reused
    toy.append("a")
    path = os.path.join(workdir, "a", "out.txt")
    if not os.path.exists(path):
      builds.append(1)
      fileio.write_text(path, f"a:{config.a.value}:build{len(builds)}")
    value = _read(workdir, "a/out.txt")
    report.add_section(workdir, key="a", title="a", order=1, html=value,
                       metrics={"a.value": value})
    return {"a.value": value}
  monkeypatch.setitem(train.STAGES, "a", train.STAGES["a"].__class__(
      **{**train.STAGES["a"].__dict__, "run": run_a}))
  train.train_and_evaluate(_config(), w)
  first = _metrics(w)
  report.remove_section(w, "a")
  toy.clear()
  train.train_and_evaluate(_config(), w)
  assert toy == ["a"] and len(builds) == 1  # a ran on its output; b and c were up to date
  assert _metrics(w) == first and manifest.load(w, "a")["status"] == "done"


def test_an_evaluation_only_change_evaluates_the_trained_run_again(toy, tmp_path, monkeypatch):
  """b trains once (b/trained.txt, a nonce) and evaluates with b.shots every run. A change of
  b.shots alone reruns b on its trained run (not refused, not retrained) and c after it; any
  other change of b is refused as before; an interrupted run resumes across such a change."""
  w = str(tmp_path)

  def run_b(config, workdir):
    toy.append("b")
    trained = os.path.join(workdir, "b", "trained.txt")
    if not os.path.exists(trained):
      fileio.write_text(trained, f"b:{config.b.value}:{os.urandom(8).hex()}")
    value = f"{_read(workdir, 'b/trained.txt')}:shots{config.b.shots}|{_read(workdir, 'a/out.txt')}"
    fileio.write_text(os.path.join(workdir, "b", "out.txt"), value)
    report.add_section(workdir, key="b", title="b", order=2, html=value,
                       metrics={"b.value": value})
    return {"b.value": value}
  stage_b = train.STAGES["b"].__class__(
      **{**train.STAGES["b"].__dict__, "run": run_b, "eval_fields": ("b.shots",)})
  monkeypatch.setitem(train.STAGES, "b", stage_b)
  config = lambda **kw: ml_collections.ConfigDict(  # noqa: E731
      dict(a=dict(value=1), b=dict(dict(value=1, shots=1), **kw), c=dict(value=1),
           stages="a,b,c", recompute=""))
  train.train_and_evaluate(config(), w)
  nonce = _read(w, "b/trained.txt")
  toy.clear()
  train.train_and_evaluate(config(shots=3), w)
  assert toy == ["b", "c"] and _read(w, "b/trained.txt") == nonce  # kept, evaluated again
  assert _read(w, "c/out.txt") == f"c:1|{nonce}:shots3|a:1"
  assert manifest.load(w, "b")["key"]["config"]["b"]["shots"] == 3
  toy.clear()
  train.train_and_evaluate(config(shots=3), w)
  assert toy == []  # up to date under the new key
  with pytest.raises(ValueError, match="b.value: 1 -> 2"):
    train.train_and_evaluate(config(shots=3, value=2), w)  # a training field: refused
  # Interrupted, then an evaluation field changed: it resumes on the kept run.
  manifest.save(w, "b", dict(manifest.load(w, "b"), status="running"))
  toy.clear()
  train.train_and_evaluate(config(shots=5), w)
  assert toy == ["b", "c"] and _read(w, "b/trained.txt") == nonce
  assert report.read_metrics(w)["b.value"] == f"{nonce}:shots5|a:1"
  # A stage without eval_fields is refused for the same change.
  monkeypatch.setitem(train.STAGES, "b", train.STAGES["b"].__class__(
      **{**stage_b.__dict__, "eval_fields": ()}))
  with pytest.raises(ValueError, match="b.shots: 5 -> 7"):
    train.train_and_evaluate(config(shots=7), w)


def test_v2l_keeps_its_trained_run_for_its_evaluation_fields_only():
  """The real v2l stage: its eval_fields are the trainer's EVAL_FIELDS (each a field of the
  demo config); a change of one of them leaves its training part alone, lr or an upstream
  field do not."""
  from test_main import ROOT, load_config  # pylint: disable=g-import-not-at-top
  from vlbpe_jax.v2l import train as v2l_train  # pylint: disable=g-import-not-at-top
  config = lambda: load_config(os.path.join(ROOT, "configs", "tiny.py"), "")  # noqa: E731
  assert train.STAGES["v2l"].eval_fields == tuple(f"v2l.{k}" for k in v2l_train.EVAL_FIELDS)
  base = config()
  assert all(k in base.v2l for k in v2l_train.EVAL_FIELDS)
  training = lambda c: train._training_part(  # noqa: E731  pylint: disable=protected-access
      "v2l", train._config_part(c, "v2l"))  # pylint: disable=protected-access
  episodes, lr, clip = config(), config(), config()
  episodes.v2l.fewshot_episodes = base.v2l.fewshot_episodes * 4
  lr.v2l.lr = base.v2l.lr * 2
  clip.clip.lr = base.clip.lr * 2
  assert train._config_part(episodes, "v2l") != train._config_part(base, "v2l")  # pylint: disable=protected-access
  assert training(episodes) == training(base)
  assert training(lr) != training(base) and training(clip) != training(base)
  assert [n for n, s in train.STAGES.items() if s.eval_fields] == ["v2l"]


def test_an_unselected_stale_stage_loses_its_report_section(toy, tmp_path):
  w = str(tmp_path)
  train.train_and_evaluate(_config(), w)
  train.train_and_evaluate(_config(c=5, stages="a"), w)
  metrics = report.read_metrics(w)
  assert "c.value" not in metrics and "b.value" in metrics  # b still matches; c does not
  assert os.path.exists(os.path.join(w, "c", "out.txt"))  # its files are kept
  with pytest.raises(ValueError, match="not up to date"):
    train.train_and_evaluate(_config(stages="c", a=1, b=1, c=5), str(tmp_path / "empty"))


def test_a_torn_manifest_is_named(toy, tmp_path):
  w = str(tmp_path)
  train.train_and_evaluate(_config(), w)
  path = manifest.path(w, "b")
  with open(path, "r+") as f:
    f.truncate(10)
  with pytest.raises(ValueError, match=path):
    train.train_and_evaluate(_config(), w)


def test_manifests_are_strict_json_with_the_key(toy, tmp_path):
  w = str(tmp_path)
  train.train_and_evaluate(_config(), w)
  with open(manifest.path(w, "c")) as f:
    m = json.load(f)
  assert m["key"]["config"] == {"a": {"shown": 0, "value": 1}, "b": {"value": 1},
                                "c": {"value": 1}}
  assert set(m["key"]["inputs"]) == {"b"} and m["outputs"].keys() == {"c/out.txt"}



def test_lm_seed_keys_the_lm_stage_and_its_reader_and_its_default_changes_no_key():
  from test_main import ROOT, load_config  # pylint: disable=g-import-not-at-top
  config = lambda: load_config(os.path.join(ROOT, "configs", "tiny.py"), "tiny")  # noqa: E731
  part = train._config_part  # pylint: disable=protected-access
  default = config()
  assert default.lm.seed == -1
  before = config()  # as configs were before lm.seed existed
  with before.unlocked():
    del before.lm["seed"]
  same, other = config(), config()
  same.lm.seed = default.seed  # the seed lm.seed=-1 stands for
  other.lm.seed = 7
  for name in train.STAGES:
    assert part(before, name) == part(default, name) == part(same, name)
    # lm.seed keys stage 0 (the text stage) and its readers: lm, dit (the LM as frozen
    # backbone), text_icl and v2l (stage 0, continued, as the frozen language model).
    assert (part(other, name) != part(default, name)) == (
        name in ("text", "lm", "dit", "text_icl", "v2l")), name
  assert manifest.describe_changes({"config": part(default, "lm")},
                                   {"config": part(other, "lm")}) == [
                                       "config lm.seed: '<missing>' -> 7"]


@pytest.mark.parametrize("field, value, keyed", [
    # Being-VL's runs alone read it: stage 0 and V2L (which reads stage 0, not the runs) keep
    # their trained runs.
    ("stage_steps", (3, 3, 3), ("lm", "dit")),
    ("num_eval", 3, ("lm", "dit")),
    ("vqa_branches", True, ("lm", "dit")),
    # V2L's frozen LM (stage 0 continued) alone reads it, and V2L reads that LM.
    ("text_phases", ((2, ("denoise",), 1e-3),), ("text_icl", "v2l")),
    # Stage 0 reads it: every stage made from the text model.
    ("text_steps", 3, ("text", "lm", "dit", "text_icl", "v2l")),
    ("batch_size", 4, ("text", "lm", "dit", "text_icl", "v2l")),
    ("denoise_ns", (2, 4), ("text", "lm", "dit", "text_icl", "v2l")),  # text_tasks may hold it
])
def test_lm_fields_key_the_stages_that_read_them(field, value, keyed):
  from test_main import ROOT, load_config  # pylint: disable=g-import-not-at-top
  config = lambda: load_config(os.path.join(ROOT, "configs", "tiny.py"), "tiny")  # noqa: E731
  part = train._config_part  # pylint: disable=protected-access
  default, other = config(), config()
  other.lm[field] = value
  assert other.lm[field] != default.lm[field]
  for name in train.STAGES:
    assert (part(other, name) != part(default, name)) == (name in keyed), name
  for name in keyed:  # the change is named as it is
    assert any(c.startswith(f"config lm.{field}:") for c in manifest.describe_changes(
        {"config": part(default, name)}, {"config": part(other, name)})), name


@pytest.mark.parametrize("field, value, keyed", [
    # The pixel decoder reads the CLIP and its own settings: the DiT's and the LM's fields
    # leave it trained (it was part of the dit stage, retrained on any of them, before).
    ("dit.total_steps", 3, ("dit",)),
    ("dit.designs", ("fm",), ("dit",)),
    ("lm.stage_steps", (3, 3, 3), ("lm", "dit")),
    ("dit.decoder.lr", 1e-4, ("pixel_decoder", "dit")),
    ("dit.decoder.total_steps", 3, ("pixel_decoder", "dit")),
    ("clip.total_steps", 3, ("clip", "pixel_decoder", "dit", "v2l")),
])
def test_pixel_decoder_is_keyed_by_its_own_fields_and_the_clip(field, value, keyed):
  from test_main import ROOT, load_config  # pylint: disable=g-import-not-at-top
  part = train._config_part  # pylint: disable=protected-access
  default = load_config(os.path.join(ROOT, "configs", "tiny.py"), "tiny")
  other = load_config(os.path.join(ROOT, "configs", "tiny.py"), "tiny")
  section, leaf = field.rsplit(".", 1)
  node = other
  for k in section.split("."):
    node = node[k]
  node[leaf] = value
  for name in train.STAGES:
    assert (part(other, name) != part(default, name)) == (name in keyed), name
  assert train.STAGES["pixel_decoder"].reads == ("data", "clip")
  assert "pixel_decoder" in train.STAGES["dit"].reads


def test_the_pixel_decoder_keys_no_dit_field_but_its_own():
  from test_main import ROOT, load_config  # pylint: disable=g-import-not-at-top
  config = load_config(os.path.join(ROOT, "configs", "tiny.py"), "tiny")
  key = train._config_part(config, "pixel_decoder")  # pylint: disable=protected-access
  # Every other field of the dit section is listed as the DiT's alone, or cosmetic.
  assert set(key["dit"]) == {"decoder"}, set(key["dit"])
  assert key["dit"]["decoder"]["lr"] == config.dit.decoder.lr


def test_a_key_regrouped_with_the_same_values_is_still_named():
  # E.g. a stage keyed by "dit.decoder" beside "dit": the flat fields are equal, the keys not.
  old = {"config": {"dit": {"decoder": {"lr": 1}}}}
  new = {"config": {"dit": {"decoder": {"lr": 1}}, "dit.decoder": {"lr": 1}}}
  assert manifest.describe_changes(old, new) == [
      "the key's layout (the same values, grouped otherwise: made by an older version of the "
      "pipeline)"]
  assert manifest.describe_changes(old, old) == []


def test_a_field_a_stage_no_longer_reads_is_named_as_such():
  # A workdir keyed before the stage's key left the field out (e.g. lm.text_phases in the lm
  # stage's key before the text_icl stage existed) is refused with that reason, not "missing".
  old, new = {"config": {"lm": {"runs": ["full"], "text_phases": []}}}, {"config": {"lm": {
      "runs": ["full"]}}}
  assert manifest.describe_changes(old, new) == [
      "config lm.text_phases: [] -> (no longer in the key: the stage does not read it)"]
  assert manifest.describe_changes(new, old) == ["config lm.text_phases: '<missing>' -> []"]


def test_config_ignores_is_what_every_reader_of_a_field_ignores():
  assert set(train.config_ignores("text")) == set(train.STAGES["text"].ignores)
  # lm ignores only text_phases; the Being-VL fields stage 0 ignores are keyed by lm.
  assert train.config_ignores("lm") == train.config_ignores("dit") == ("lm.text_phases",)
  # text_icl (and v2l, which reads it) key text_phases, not Being-VL's fields.
  assert "lm.text_phases" not in train.config_ignores("text_icl")
  assert set(train.config_ignores("text_icl")) == set(train.config_ignores("v2l")) == (
      set(train.STAGES["text"].ignores) - {"lm.text_phases"})
  assert all(train.config_ignores(n) == () for n in ("data", "vq", "bpe", "clip"))
  # The pixel decoder keys dit.decoder alone of the dit section; dit keys all of it.
  assert train.config_ignores("pixel_decoder") == tuple(sorted(train.STAGES[
      "pixel_decoder"].ignores))
  assert train.config_ignores("dit") == ("lm.text_phases",)


def test_data_shards_key_their_stage_and_readers_and_their_default_changes_no_key():
  from test_main import ROOT, load_config  # pylint: disable=g-import-not-at-top
  config = lambda: load_config(os.path.join(ROOT, "configs", "tiny.py"), "tiny")  # noqa: E731
  part = train._config_part  # pylint: disable=protected-access
  default, before = config(), config()  # before: as configs were before data_shards existed
  sections = lambda c: (c.lm, c.vq, c.clip, c.dit, c.dit.decoder, c.v2l)  # noqa: E731
  assert [s.data_shards for s in sections(default)] == [0] * 6
  with before.unlocked():
    for section in sections(before):
      del section["data_shards"]
  dit, clip = config(), config()
  dit.dit.data_shards = 2
  clip.clip.data_shards = 2
  for name in train.STAGES:
    assert part(before, name) == part(default, name), name
    assert (part(dit, name) != part(default, name)) == (name == "dit"), name
    assert (part(clip, name) != part(default, name)) == (
        name in ("clip", "pixel_decoder", "dit", "v2l")), name
  assert manifest.describe_changes({"config": part(default, "dit")},
                                   {"config": part(dit, "dit")}) == [
                                       "config dit.data_shards: '<missing>' -> 2"]


def test_clip_hard_negatives_key_clip_and_readers_and_their_default_changes_no_key():
  from test_main import ROOT, load_config  # pylint: disable=g-import-not-at-top
  config = lambda: load_config(os.path.join(ROOT, "configs", "tiny.py"), "tiny")  # noqa: E731
  part = train._config_part  # pylint: disable=protected-access
  default, before, hard = config(), config(), config()
  assert tuple(default.clip.hard_negatives) == ()
  with before.unlocked():  # as configs were before clip.hard_negatives existed
    del before.clip["hard_negatives"]
  hard.clip.hard_negatives = ("shape",)
  for name in train.STAGES:
    assert part(before, name) == part(default, name), name
    assert (part(hard, name) != part(default, name)) == (
        name in ("clip", "pixel_decoder", "dit", "v2l")), name
