"""tfds builders (array_record, no TensorFlow) for shapes scenes and users' image-text data.

  builder = build_shapes(data_dir, resolution=64, num_train=1000, num_validation=100,
                         num_test=100, seed=0)
  train = data_source(builder, "train")       # random access: len(train), train[i]
  ex = decode_record(train[0])                # {"image": uint8 [R, R, 3], "qa": [...], ...}

  build_llava(data_dir, annotations="llava.json", image_dir="images/")
  build_caption_pairs(data_dir, annotations={"train": "train.jsonl"}, image_dir="images/")

Records are read with `builder.as_data_source()` (the only reader that works without
TensorFlow). tfds stores records in hashed-key order; the `index` feature is the example's
position in its split (shapes) or annotation file (user data). Structured fields are JSON
strings (`JSON_FIELDS`); `decode_record` parses them. Shapes images are uint8 tensors; user
images keep their original encoded bytes (any format Pillow reads).

User data fails at build time, never in a reader worker: records and image paths are checked
before anything is written, each image is fully decoded while writing, and a malformed record
(bad JSON, missing key, a "from" other than "human"/"gpt") or a missing or unreadable image
raises a ValueError naming the file and the record (LLaVA: position and "id"; JSONL: line
number). Annotation files are untrusted: an image path that leaves the image folder (absolute,
`..`, a symlink resolving outside) is refused, and so is a file without records.

Config names hold a hash of the inputs so that nothing stale is reused: shapes, of a few
generated examples (a changed generator builds anew); user data, of the annotation files
(images are not hashed: after replacing images in place, pass `name=`).
"""

import dataclasses
import hashlib
import io
import json
import os
import re
import tempfile
import threading

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

JSON_FIELDS = ("objects", "captions", "attributes", "qa", "dialogue", "conversations")
_TEXT_FIELDS = ("caption", "background", "id", "image_path")
_ROLES = ("human", "gpt")
_FORMAT = "array_record"
# `_prepare` swaps the process-wide `tempfile.tempdir` and may write a dataset's files: one
# thread at a time (the pipeline's stages may run on several, `config.stage_workers`).
_PREPARE_LOCK = threading.Lock()


def _json(value) -> str:
  return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _bytes_feature():
  return tfds.features.Tensor(shape=(), dtype=np.object_)


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  resolution: int = 64
  num_train: int = 1000
  num_validation: int = 100
  num_test: int = 100
  seed: int = 0


def _shapes_fingerprint(seed, resolution) -> str:
  """Hash of a few generated examples: a changed generator gets a new config (no stale cache)."""
  from vlbpe_jax.data import shapes  # pylint: disable=g-import-not-at-top  (tfds-free module)
  h = hashlib.sha1()
  for split in shapes.SPLITS:
    for i in range(2):
      ex = shapes.make_example(i, split, seed=seed, resolution=resolution)
      h.update(np.ascontiguousarray(ex["image"]).tobytes())
      h.update(_json({k: v for k, v in ex.items() if k != "image"}).encode())
  return h.hexdigest()[:8]


def shapes_config(*, resolution=64, num_train=1000, num_validation=100, num_test=100,
                  seed=0) -> ShapesConfig:
  for key, value in dict(resolution=resolution, num_train=num_train,
                         num_validation=num_validation, num_test=num_test).items():
    if int(value) != value or value < 1:
      raise ValueError(f"{key}={value!r}: expected a positive integer")
  name = (f"r{resolution}_n{num_train}-{num_validation}-{num_test}_s{seed}_"
          f"{_shapes_fingerprint(seed, resolution)}")
  return ShapesConfig(name=name, resolution=resolution, num_train=num_train,
                      num_validation=num_validation, num_test=num_test, seed=seed,
                      description="Procedural shapes scenes (vlbpe_jax.data.shapes).")


class ShapesBuilder(tfds.core.GeneratorBasedBuilder):
  """Procedural scenes: image, objects, captions, attributes, VQA, dialogue."""

  name = "vlbpe_shapes"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "image uint8 [R, R, 3]; JSON objects/captions/attributes/qa/"
                            "dialogue; caption and background text; index."}

  def __init__(self, *, config=None, **kwargs):
    super().__init__(config=config or shapes_config(), **kwargs)

  def _info(self):
    r = self.builder_config.resolution
    features = dict(index=np.int64, image=tfds.features.Tensor(shape=(r, r, 3), dtype=np.uint8),
                    caption=tfds.features.Text(), background=tfds.features.Text(),
                    **{k: tfds.features.Text() for k in JSON_FIELDS if k != "conversations"})
    return tfds.core.DatasetInfo(builder=self, description=__doc__.splitlines()[0],
                                 features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    del dl_manager
    from vlbpe_jax.data import shapes  # pylint: disable=g-import-not-at-top  (tfds-free module)
    c = self.builder_config
    sizes = {"train": c.num_train, "validation": c.num_validation, "test": c.num_test}
    return {split: self._generate_examples(shapes, split, sizes[split])
            for split in shapes.SPLITS}

  def _generate_examples(self, shapes, split, num):
    c = self.builder_config
    for i in range(num):
      ex = shapes.make_example(i, split, seed=c.seed, resolution=c.resolution)
      yield i, dict(index=i, image=ex["image"], caption=ex["caption"],
                    background=ex.get("background", ""),
                    **{k: _json(ex[k]) for k in JSON_FIELDS if k != "conversations"})


@dataclasses.dataclass(eq=False)
class UserDataConfig(tfds.core.BuilderConfig):
  """`annotations`: ((split, file), ...); image paths in the files are relative to image_dir."""
  annotations: tuple = ()
  image_dir: str = ""


def user_data_config(annotations, image_dir, name=None) -> UserDataConfig:
  """Config for `LlavaBuilder`/`CaptionPairsBuilder`; `annotations`: a file or {split: file}."""
  if isinstance(annotations, (str, os.PathLike)):
    annotations = {"train": annotations}
  if not isinstance(annotations, dict) or not annotations:
    raise ValueError(f"annotations={annotations!r}: expected a file path or {{split: path}}")
  annotations = tuple((str(s), os.path.abspath(p)) for s, p in sorted(annotations.items()))
  for split, path in annotations:
    if not os.path.isfile(path):
      raise ValueError(f"annotations[{split!r}]={path!r}: no such file")
  image_dir = os.path.abspath(image_dir)
  if not os.path.isdir(image_dir):
    raise ValueError(f"image_dir={image_dir!r}: no such directory")
  if name is None:
    h = hashlib.sha1(image_dir.encode())
    for split, path in annotations:
      h.update(split.encode())
      with open(path, "rb") as f:
        h.update(f.read())
    stem = re.sub(r"[^a-z0-9]+", "_", os.path.basename(annotations[0][1]).lower()).strip("_")
    name = f"{stem}_{h.hexdigest()[:10]}"
  return UserDataConfig(name=name, annotations=annotations, image_dir=image_dir)


def _image_bytes(path, where) -> bytes:
  """The file's bytes, after checking that Pillow decodes it fully."""
  if not os.path.isfile(path):
    raise ValueError(f"{where}: image file {path!r} does not exist")
  with open(path, "rb") as f:
    data = f.read()
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.convert("RGB")
  except Exception as e:  # Pillow raises many types for broken files.
    raise ValueError(f"{where}: image file {path!r} is not a readable image ({e})") from e
  return data


def _image_file(image_dir, image, where) -> str:
  """`image_dir/image`; refuses a path that leaves the folder (annotation files are untrusted):
  absolute, `..` or a symlink resolving outside. Symlinks inside the folder are followed."""
  root = os.path.realpath(image_dir)
  resolved = None if "\0" in image else os.path.realpath(os.path.join(root, image))
  if os.path.isabs(image) or resolved is None or os.path.commonpath([root, resolved]) != root:
    raise ValueError(f"{where}: image={image!r} resolves outside image_dir {image_dir!r}; "
                     "expected a relative path to a file inside it")
  return os.path.join(image_dir, image)


def _require(record, key, kind, where):
  if not isinstance(record, dict) or key not in record:
    raise ValueError(f"{where}: missing key {key!r} (record: {str(record)[:200]})")
  if not isinstance(record[key], kind):
    raise ValueError(f"{where}: {key}={str(record[key])[:100]!r} is a "
                     f"{type(record[key]).__name__}; expected {kind}")
  return record[key]


def _read_llava(path, image_dir):
  """Validated records of a LLaVA instruction file: [(index, id, image path, turns)]."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not a JSON file ({e})") from e
  if not isinstance(data, list):
    raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
  out = []
  for i, rec in enumerate(data):
    rid = rec.get("id", "?") if isinstance(rec, dict) else "?"
    where = f"{path}: record {i} (id={rid!r})"
    rid = _require(rec, "id", (str, int), where)
    image = _require(rec, "image", str, where)
    turns = _require(rec, "conversations", list, where)
    if not turns:
      raise ValueError(f"{where}: 'conversations' is empty")
    for t, turn in enumerate(turns):
      _require(turn, "value", str, f"{where} turn {t}")
      if _require(turn, "from", str, f"{where} turn {t}") not in _ROLES:
        raise ValueError(f"{where} turn {t}: from={turn['from']!r}; expected one of {_ROLES}")
    image_path = _image_file(image_dir, image, where)
    if not os.path.isfile(image_path):
      raise ValueError(f"{where}: image file {image_path!r} does not exist")
    out.append((i, str(rid), image, [{"from": t["from"], "value": t["value"]} for t in turns]))
  if not out:
    raise ValueError(f"{path}: no records; expected a JSON list of at least one record")
  return out


def _read_caption_pairs(path, image_dir):
  """Validated records of a JSONL caption file: [(line number, image path, caption)]."""
  out = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{line_no}"
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not a JSON object ({e})") from e
      image = _require(rec, "image", str, where)
      caption = _require(rec, "caption", str, where)
      image_path = _image_file(image_dir, image, where)
      if not os.path.isfile(image_path):
        raise ValueError(f"{where}: image file {image_path!r} does not exist")
      out.append((line_no, image, caption))
  if not out:
    raise ValueError(f"{path}: no records; expected at least one JSON line")
  return out


class LlavaBuilder(tfds.core.GeneratorBasedBuilder):
  """LLaVA-style instruction data: JSON list of {id, image, conversations} + image folder."""

  name = "vlbpe_llava"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "index, id, image (encoded bytes), image_path, conversations JSON."}

  def _info(self):
    features = dict(index=np.int64, id=tfds.features.Text(), image=_bytes_feature(),
                    image_path=tfds.features.Text(), conversations=tfds.features.Text())
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                 features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    records = {s: _read_llava(p, c.image_dir) for s, p in c.annotations}  # Fail before writing.
    return {s: self._generate_examples(dict(c.annotations)[s], r) for s, r in records.items()}

  def _generate_examples(self, path, records):
    for i, rid, image, turns in records:
      where = f"{path}: record {i} (id={rid!r})"
      data = _image_bytes(_image_file(self.builder_config.image_dir, image, where), where)
      yield i, dict(index=i, id=rid, image=data, image_path=image, conversations=_json(turns))


class CaptionPairsBuilder(tfds.core.GeneratorBasedBuilder):
  """Image-caption pairs: JSONL of {image, caption} + image folder."""

  name = "vlbpe_caption_pairs"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "index (line number), image (encoded bytes), image_path, caption."}

  def _info(self):
    features = dict(index=np.int64, image=_bytes_feature(), image_path=tfds.features.Text(),
                    caption=tfds.features.Text())
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                 features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    records = {s: _read_caption_pairs(p, c.image_dir) for s, p in c.annotations}
    return {s: self._generate_examples(dict(c.annotations)[s], r) for s, r in records.items()}

  def _generate_examples(self, path, records):
    for line_no, image, caption in records:
      where = f"{path}:{line_no}"
      data = _image_bytes(_image_file(self.builder_config.image_dir, image, where), where)
      yield line_no, dict(index=line_no, image=data, image_path=image, caption=caption)


def _prepare(builder_cls, data_dir, config):
  """`builder_cls(...)`, prepared. TFDS makes an empty `tmp*tfds` folder in the temp dir for
  each builder of a not yet prepared dataset (`DatasetInfo.initialize_from_bucket`, GCS being
  off) and never removes it; it is made inside a temporary folder of ours and removed with it."""
  with _PREPARE_LOCK:
    with tempfile.TemporaryDirectory(prefix="vlbpe_tfds_") as scratch:
      before, tempfile.tempdir = tempfile.tempdir, scratch
      try:
        builder = builder_cls(data_dir=data_dir, config=config, file_format=_FORMAT)
      finally:
        tempfile.tempdir = before
    builder.download_and_prepare(file_format=_FORMAT)
  return builder


def build_shapes(data_dir, *, resolution=64, num_train=1000, num_validation=100, num_test=100,
                 seed=0) -> ShapesBuilder:
  """Builds (once; later calls reuse the files) the shapes dataset under `data_dir`."""
  config = shapes_config(resolution=resolution, num_train=num_train,
                         num_validation=num_validation, num_test=num_test, seed=seed)
  return _prepare(ShapesBuilder, data_dir, config)


def build_llava(data_dir, *, annotations, image_dir, name=None) -> LlavaBuilder:
  config = user_data_config(annotations, image_dir, name)
  return _prepare(LlavaBuilder, data_dir, config)


def build_caption_pairs(data_dir, *, annotations, image_dir, name=None) -> CaptionPairsBuilder:
  config = user_data_config(annotations, image_dir, name)
  return _prepare(CaptionPairsBuilder, data_dir, config)


def data_source(builder, split: str):
  """Random-access source (`len`, `[i]`) of one split, for grain."""
  if split not in builder.info.splits:
    raise ValueError(f"split={split!r}: expected one of {sorted(builder.info.splits)}")
  return builder.as_data_source(split=split)


def decode_record(record) -> dict:
  """A stored record as numpy/python: image uint8 [H, W, 3], JSON fields parsed, str texts.

  Already-decoded fields (e.g. a `shapes.make_example` dict) pass through unchanged.
  """
  out = dict(record)
  image = out.get("image")
  if isinstance(image, bytes):
    with Image.open(io.BytesIO(image)) as im:
      out["image"] = np.asarray(im.convert("RGB"))
  for key in JSON_FIELDS:
    if isinstance(out.get(key), (str, bytes)):
      out[key] = json.loads(_str(out[key]))
  for key in _TEXT_FIELDS:
    if key in out:
      out[key] = _str(out[key])
  if "index" in out:
    out["index"] = int(out["index"])
  return out


def _str(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)
