"""Tests for vlbpe_jax/data/tfds_builders.py: shapes, LLaVA and caption-pair builders."""

import json
import os
import re
import sys

import numpy as np
from PIL import Image
import pytest

from vlbpe_jax.data import shapes
from vlbpe_jax.data import tfds_builders as tb


@pytest.fixture(scope="module")
def shapes_builder(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  return tb.build_shapes(data_dir, resolution=32, num_train=6, num_validation=2, num_test=3,
                         seed=5), data_dir


def test_shapes_builder_matches_generator(shapes_builder):
  shapes_builder, _ = shapes_builder
  assert "tensorflow" not in sys.modules
  assert shapes_builder.info.version == "1.0.0"
  assert {s: len(tb.data_source(shapes_builder, s)) for s in shapes.SPLITS} == {
      "train": 6, "validation": 2, "test": 3}
  for split in ("train", "test"):
    src = tb.data_source(shapes_builder, split)
    got = sorted((tb.decode_record(src[i]) for i in range(len(src))), key=lambda r: r["index"])
    assert [r["index"] for r in got] == list(range(len(src)))
    for rec in got:
      ref = shapes.make_example(rec["index"], split, seed=5, resolution=32)
      assert rec["image"].dtype == np.uint8 and rec["image"].shape == (32, 32, 3)
      np.testing.assert_array_equal(rec["image"], ref["image"])
      for key in ("objects", "caption", "captions", "attributes", "qa", "dialogue"):
        assert rec[key] == ref[key], key


def test_shapes_rebuild_reuses_files_and_configs_differ(shapes_builder, tmp_path):
  shapes_builder, data_dir = shapes_builder
  again = tb.build_shapes(data_dir, resolution=32, num_train=6, num_validation=2, num_test=3,
                          seed=5)
  assert again.data_dir == shapes_builder.data_dir
  other = tb.build_shapes(tmp_path, resolution=32, num_train=2, num_validation=1, num_test=1,
                          seed=6)
  assert other.data_dir != shapes_builder.data_dir
  assert tb.decode_record(tb.data_source(other, "train")[0])["caption"]
  with pytest.raises(ValueError, match="split='dev'"):
    tb.data_source(other, "dev")
  with pytest.raises(ValueError, match="num_train=0"):
    tb.build_shapes(tmp_path, num_train=0)
  default = tb.ShapesBuilder(data_dir=tmp_path)  # Not prepared: 1000 examples at 64x64.
  assert default.builder_config.name.startswith("r64_n1000-100-100_s0_")
  assert default.info.features["image"].shape == (64, 64, 3)


def test_building_leaves_nothing_in_the_temp_dir(tmp_path, monkeypatch):
  # TFDS makes an empty tmp*tfds folder per builder of an unprepared dataset and keeps it.
  tmp = tmp_path / "tmp"
  tmp.mkdir()
  monkeypatch.setattr("tempfile.tempdir", str(tmp))
  tb.build_shapes(tmp_path / "data", resolution=32, num_train=2, num_validation=1, num_test=1,
                  seed=7)
  assert os.listdir(tmp) == []


def _write_images(root, names, size=(12, 9)):
  os.makedirs(root / "img", exist_ok=True)
  arrays = {}
  for k, name in enumerate(names):
    a = np.random.default_rng(k).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(a).save(root / "img" / name)  # PNG is lossless: we can compare pixels.
    arrays[name] = a
  return arrays


def _llava_records():
  return [
      {"id": "a1", "image": "x.png", "conversations": [
          {"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": "noise"}]},
      {"id": 7, "image": "sub/y.png", "conversations": [
          {"from": "human", "value": "color?"}, {"from": "gpt", "value": "many"},
          {"from": "human", "value": "sure?"}, {"from": "gpt", "value": "yes"}]},
  ]


def test_llava_builder(tmp_path):
  os.makedirs(tmp_path / "img" / "sub")
  arrays = _write_images(tmp_path, ["x.png", "sub/y.png"])
  (tmp_path / "llava.json").write_text(json.dumps(_llava_records()))
  builder = tb.build_llava(tmp_path / "tfds", annotations=tmp_path / "llava.json",
                           image_dir=tmp_path / "img")
  src = tb.data_source(builder, "train")
  recs = sorted((tb.decode_record(src[i]) for i in range(len(src))), key=lambda r: r["index"])
  assert [r["id"] for r in recs] == ["a1", "7"]
  assert recs[1]["conversations"] == _llava_records()[1]["conversations"]
  np.testing.assert_array_equal(recs[1]["image"], arrays["sub/y.png"])
  assert recs[0]["image_path"] == "x.png"


def test_caption_pairs_builder_two_splits(tmp_path):
  arrays = _write_images(tmp_path, ["a.png", "b.png", "c.png"])
  (tmp_path / "train.jsonl").write_text(
      '{"image": "a.png", "caption": "first"}\n\n{"image": "b.png", "caption": "second"}\n')
  (tmp_path / "val.jsonl").write_text('{"image": "c.png", "caption": "third"}\n')
  builder = tb.build_caption_pairs(
      tmp_path / "tfds", annotations={"train": tmp_path / "train.jsonl",
                                      "validation": tmp_path / "val.jsonl"},
      image_dir=tmp_path / "img")
  train = sorted((tb.decode_record(r) for r in tb.data_source(builder, "train")),
                 key=lambda r: r["index"])
  assert [(r["index"], r["caption"]) for r in train] == [(1, "first"), (3, "second")]
  np.testing.assert_array_equal(train[1]["image"], arrays["b.png"])
  (val,) = tb.data_source(builder, "validation")
  assert tb.decode_record(val)["caption"] == "third"


def test_config_name_follows_annotation_contents(tmp_path):
  _write_images(tmp_path, ["a.png"])
  path = tmp_path / "c.jsonl"
  path.write_text('{"image": "a.png", "caption": "one"}\n')
  first = tb.user_data_config(path, tmp_path / "img").name
  path.write_text('{"image": "a.png", "caption": "two"}\n')
  assert tb.user_data_config(path, tmp_path / "img").name != first
  assert tb.user_data_config(path, tmp_path / "img", name="mine").name == "mine"


@pytest.mark.parametrize("records, match", [
    ([{"id": "r0", "image": "x.png", "conversations": [{"from": "human", "value": "q"}]},
      {"id": "r1", "image": "x.png"}],
     r"llava.json: record 1 \(id='r1'\): missing key 'conversations'"),
    ([{"id": "r0", "image": "x.png", "conversations": [{"from": "system", "value": "q"}]}],
     r"record 0 \(id='r0'\) turn 0: from='system'"),
    ([{"id": "r0", "image": "x.png", "conversations": [{"from": "gpt"}]}],
     r"record 0 \(id='r0'\) turn 0: missing key 'value'"),
    ([{"id": "r0", "image": "nope.png", "conversations": [{"from": "gpt", "value": "a"}]}],
     r"record 0 \(id='r0'\): image file '.*nope.png' does not exist"),
    ([{"id": "r0", "image": "broken.png", "conversations": [{"from": "gpt", "value": "a"}]}],
     r"record 0 \(id='r0'\): image file '.*broken.png' is not a readable image"),
    ({"not": "a list"}, "expected a JSON list"),
])
def test_llava_errors_name_the_record(tmp_path, records, match):
  _write_images(tmp_path, ["x.png"])
  (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
  (tmp_path / "llava.json").write_text(json.dumps(records))
  with pytest.raises(ValueError, match=match):
    tb.build_llava(tmp_path / "tfds", annotations=tmp_path / "llava.json",
                   image_dir=tmp_path / "img")


@pytest.mark.parametrize("lines, match", [
    (['{"image": "a.png", "caption": "ok"}', '{"image": "a.png", "caption": '],
     r"c.jsonl:2: not a JSON object"),
    (['{"image": "a.png"}'], r"c.jsonl:1: missing key 'caption'"),
    (['{"image": "a.png", "caption": 3}'], r"c.jsonl:1: caption='3' is a int"),
    (['{"image": "gone.png", "caption": "x"}'], r"c.jsonl:1: image file .*gone.png"),
    (['{"image": "a.png", "caption": "x"}', '{"image": "bad.jpg", "caption": "x"}'],
     r"c.jsonl:2: image file .*bad.jpg' is not a readable image"),
])
def test_caption_pairs_errors_name_the_line(tmp_path, lines, match):
  _write_images(tmp_path, ["a.png"])
  (tmp_path / "img" / "bad.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
  (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=match):
    tb.build_caption_pairs(tmp_path / "tfds", annotations=tmp_path / "c.jsonl",
                           image_dir=tmp_path / "img")


def test_bad_paths(tmp_path):
  with pytest.raises(ValueError, match="no such file"):
    tb.user_data_config(tmp_path / "missing.json", tmp_path)
  (tmp_path / "a.json").write_text("[]")
  with pytest.raises(ValueError, match="image_dir=.*no such directory"):
    tb.user_data_config(tmp_path / "a.json", tmp_path / "nodir")


def _outside_image_dir(tmp_path):
  """An image beside (not inside) the image folder, and a symlink inside pointing to it."""
  _write_images(tmp_path, ["x.png"])
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "secret.png")
  os.symlink(tmp_path / "secret.png", tmp_path / "img" / "link.png")
  os.symlink(tmp_path / "img" / "x.png", tmp_path / "img" / "inside_link.png")
  return str(tmp_path / "secret.png")


@pytest.mark.parametrize("image", ["../secret.png", "ABS", "link.png", "sub/../../secret.png"])
def test_llava_refuses_images_outside_the_folder(tmp_path, image):
  secret = _outside_image_dir(tmp_path)
  image = secret if image == "ABS" else image
  records = [{"id": "ok", "image": "inside_link.png",
              "conversations": [{"from": "gpt", "value": "a"}]},
             {"id": "evil", "image": image, "conversations": [{"from": "gpt", "value": "a"}]}]
  (tmp_path / "llava.json").write_text(json.dumps(records))
  with pytest.raises(ValueError, match=r"llava.json: record 1 \(id='evil'\): image=" +
                     re.escape(repr(image)) + ".*outside image_dir"):
    tb.build_llava(tmp_path / "tfds", annotations=tmp_path / "llava.json",
                   image_dir=tmp_path / "img")


@pytest.mark.parametrize("image", ["../secret.png", "ABS", "link.png"])
def test_caption_pairs_refuse_images_outside_the_folder(tmp_path, image):
  secret = _outside_image_dir(tmp_path)
  image = secret if image == "ABS" else image
  (tmp_path / "c.jsonl").write_text(json.dumps({"image": "inside_link.png", "caption": "ok"}) +
                                    "\n" + json.dumps({"image": image, "caption": "x"}) + "\n")
  with pytest.raises(ValueError, match=r"c.jsonl:2: image=.*outside image_dir"):
    tb.build_caption_pairs(tmp_path / "tfds", annotations=tmp_path / "c.jsonl",
                           image_dir=tmp_path / "img")


def test_a_symlink_inside_the_folder_is_read(tmp_path):
  _outside_image_dir(tmp_path)
  (tmp_path / "c.jsonl").write_text('{"image": "inside_link.png", "caption": "ok"}\n')
  builder = tb.build_caption_pairs(tmp_path / "tfds", annotations=tmp_path / "c.jsonl",
                                   image_dir=tmp_path / "img")
  (rec,) = tb.data_source(builder, "train")
  assert tb.decode_record(rec)["image_path"] == "inside_link.png"


@pytest.mark.parametrize("build, name, text", [
    (tb.build_llava, "llava.json", "[]"),
    (tb.build_caption_pairs, "c.jsonl", "\n\n"),
])
def test_empty_annotations_name_the_file(tmp_path, build, name, text):
  _write_images(tmp_path, ["x.png"])
  (tmp_path / name).write_text(text)
  with pytest.raises(ValueError, match=re.escape(str(tmp_path / name)) + ": no records"):
    build(tmp_path / "tfds", annotations=tmp_path / name, image_dir=tmp_path / "img")
