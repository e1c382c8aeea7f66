"""CLIP model, loss, feature pooling, ids convention and zero-shot helpers (tiny sizes)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax.sharding import PartitionSpec as P

from vlbpe_jax import parallel
from vlbpe_jax.clip import features
from vlbpe_jax.clip import layers
from vlbpe_jax.clip import loss as clip_loss
from vlbpe_jax.clip import model as clip_model
from vlbpe_jax.clip import text as clip_text
from vlbpe_jax.clip import zero_shot
from vlbpe_jax.data import shapes

CFG = clip_model.config_for("tiny", image_size=16, patch_size=4, context_len=48, vocab_size=128)
IDS = np.zeros((2, 48), np.int32)
IDS[:, :4] = [5, 6, 7, 2]


@pytest.fixture(scope="module", name="tiny")
def _tiny():
  """(model, boxed params, images [2, 16, 16, 3], apply): initialised once (compiling the
  initialisers dominates these tests' time on CPU)."""
  model = clip_model.CLIP(CFG)
  images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
  key = jax.random.key(0, impl="rbg")  # compiles the initialisers ~2x faster than threefry
  boxed = jax.jit(model.init)(key, images, jnp.asarray(IDS))["params"]
  apply = jax.jit(lambda p, *a, method="__call__": model.apply({"params": p}, *a, method=method),
                  static_argnames="method")
  return model, boxed, images, apply


def test_shapes_names_and_temperature(tiny):
  _, boxed, images, apply = tiny
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.Partitioned) for x in leaves)  # every param has logical names
  params = nn.unbox(boxed)
  img, txt, scale = apply(params, images, jnp.asarray(IDS))
  assert img.shape == txt.shape == (2, CFG.embed_dim)
  np.testing.assert_allclose(scale, np.log(1 / 0.07), rtol=1e-6)
  feats = apply(params, images, method="patch_features")
  assert feats.shape == (2, 4, 4, CFG.width)
  # patch_features are the last block's patch tokens, before ln_post: not unit-normalised.
  assert not np.allclose(np.std(np.asarray(feats), axis=-1), 1.0, atol=1e-3)


def test_logical_names_map_to_the_mesh(tiny):
  model, _, images, _ = tiny
  mesh = parallel.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  rules = lambda: nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES)  # noqa: E731
  ids = jnp.asarray(IDS)
  with jax.set_mesh(mesh), rules():
    abstract = jax.eval_shape(model.init, jax.random.key(0), images, ids)["params"]
    shardings = parallel.logical_shardings(abstract, mesh)
  plain = nn.unbox(abstract)  # outside the mesh: no sharding constraint on abstract values
  with jax.set_mesh(mesh), rules():  # traces every logical constraint (lowers, no compile)
    jax.jit(lambda p: model.apply({"params": p}, images, ids), in_shardings=(shardings,)).lower(
        plain)
  assert shardings["text"]["token_embedding"].spec == P("tensor", "fsdp")
  attn = shardings["visual"]["transformer"]["blocks_0"]["attn"]
  assert attn["q"].spec == P("fsdp", "tensor", None)


def test_bad_inputs_raise(tiny):
  model, boxed, images, _ = tiny
  params = nn.unbox(boxed)
  with pytest.raises(ValueError, match="images shape"):
    model.apply({"params": params}, images[:, :14, :14], method="encode_image")
  with pytest.raises(ValueError, match="context_len=48"):
    model.apply({"params": params}, jnp.ones((2, 49), jnp.int32), method="encode_text")
  with pytest.raises(ValueError, match="patch_size=4"):
    clip_model.config_for("tiny", image_size=18, patch_size=4)
  with pytest.raises(ValueError, match="variant='XL'"):
    clip_model.config_for("XL")
  with pytest.raises(ValueError, match="widht"):
    clip_model.config_for("tiny", widht=3)


def test_text_feature_depends_only_on_tokens_up_to_eos(tiny):
  _, boxed, _, apply = tiny
  params = nn.unbox(boxed)
  enc = lambda ids: np.asarray(  # noqa: E731
      apply(params, jnp.asarray(ids, jnp.int32), method="encode_text"))
  pad = [0] * 8
  full = enc([[5, 6, 7, 2] + pad, [9, 3, 2, 0] + pad])
  short = enc([[5, 6, 7, 2], [9, 3, 2, 0]])  # fewer pads: same features
  np.testing.assert_allclose(full, short, atol=1e-5)
  other = enc([[5, 6, 8, 2] + pad, [9, 3, 2, 0] + pad])
  assert not np.allclose(full[0], other[0], atol=1e-4)  # a token before the EOS matters
  np.testing.assert_allclose(full[1], other[1], atol=1e-6)


def test_causal_blocks_see_only_the_past(tiny):
  c = CFG
  params = {"params": nn.unbox(tiny[1])["text"]["transformer"]}  # the text tower's blocks
  block = layers.Transformer(c.text_depth, c.text_heads, c.text_mlp, c.act, causal=True)
  x = jax.random.normal(jax.random.key(0), (1, 6, c.text_width))
  y, y2 = jax.jit(block.apply)(params, jnp.concatenate([x, x.at[:, 4:].set(3.0)]))
  np.testing.assert_allclose(y[:4], y2[:4], atol=1e-6)
  assert not np.allclose(y[4:], y2[4:])
  bidir = layers.Transformer(c.text_depth, c.text_heads, c.text_mlp, c.act, causal=False)
  z, z2 = jax.jit(bidir.apply)(params, jnp.concatenate([x, x.at[:, 4:].set(3.0)]))
  assert not np.allclose(z[:4], z2[:4])


def _numpy_infonce(img, txt, scale):
  img = img / np.linalg.norm(img, axis=1, keepdims=True)
  txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
  logits = scale * img @ txt.T
  def ce(lg):
    lg = lg - lg.max(axis=1, keepdims=True)
    return np.mean(np.log(np.exp(lg).sum(axis=1)) - np.diag(lg))
  return (ce(logits) + ce(logits.T)) / 2


def test_clip_loss_matches_numpy_and_clips_scale():
  img = np.array([[1.0, 0.0, 0.5], [0.2, 2.0, 0.0], [0.0, 0.3, -1.0]], np.float32)
  txt = np.array([[0.9, 0.1, 0.0], [0.0, 0.5, 0.5], [0.4, 0.0, -2.0]], np.float32)
  loss, m = clip_loss.clip_loss(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(np.log(10.0)))
  np.testing.assert_allclose(loss, _numpy_infonce(img, txt, 10.0), rtol=1e-5)
  # Row 1's best text is 1; text 1's best image is 1; image 0 <-> text 0; 2 <-> 2.
  np.testing.assert_allclose([m["i2t_acc"], m["t2i_acc"], m["temperature"]], [1, 1, 0.1],
                             rtol=1e-6)
  loss, m = clip_loss.clip_loss(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(np.log(500.0)))
  np.testing.assert_allclose(loss, _numpy_infonce(img, txt, 100.0), rtol=1e-5)
  np.testing.assert_allclose(m["scale"], 100.0)


def test_hard_negatives_join_the_image_to_text_softmax_only():
  img = np.array([[1.0, 0.0, 0.5], [0.2, 2.0, 0.0], [0.0, 0.3, -1.0]], np.float32)
  txt = np.array([[0.9, 0.1, 0.0], [0.0, 0.5, 0.5], [0.4, 0.0, -2.0]], np.float32)
  neg = np.array([[1.0, 0.0, 0.4], [0.0, -1.0, 0.0], [0.3, 0.3, 0.3]], np.float32)
  loss, m = clip_loss.clip_loss(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(np.log(10.0)),
                                neg_emb=jnp.asarray(neg))
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
  logits = 10.0 * unit(img) @ unit(txt).T
  both = np.concatenate([logits, 10.0 * unit(img) @ unit(neg).T], axis=1)  # [3, 6]
  i2t = np.mean(np.log(np.exp(both).sum(1)) - np.diag(logits))
  t2i = np.mean(np.log(np.exp(logits.T).sum(1)) - np.diag(logits))
  np.testing.assert_allclose(loss, (i2t + t2i) / 2, rtol=1e-5)
  # Image 0's negative is closer than its caption; images 1 and 2 prefer their captions.
  np.testing.assert_allclose(m["hard_neg_acc"], 2 / 3, rtol=1e-6)
  assert float(loss) > float(clip_loss.clip_loss(jnp.asarray(img), jnp.asarray(txt),
                                                 jnp.asarray(np.log(10.0)))[0])
  with pytest.raises(AssertionError):
    clip_loss.clip_loss(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(0.0),
                        neg_emb=jnp.asarray(neg[:2]))


def test_hard_negative_captions_differ_from_the_caption_in_one_word():
  from vlbpe_jax.clip import train as clip_train  # pylint: disable=g-import-not-at-top
  scenes = [shapes.make_scene(i, "train") for i in range(200)]
  negs = clip_train.hard_negative_captions(scenes, ("shape",), seed=0)
  heldout = {f"{c} {s}" for c, s in shapes.heldout_compositions()}
  changed = set()
  for objs, row in zip(scenes, negs):
    caps = shapes.captions(objs)
    assert len(row) == len(caps)
    for cap, neg in zip(caps, row):
      a, b = cap.split(), neg.split()
      diff = [(x, y) for x, y in zip(a, b) if x != y]
      assert len(a) == len(b) and len(diff) == 1, (cap, neg)
      changed.add(diff[0][0].strip(".,"))
      assert not any(h in neg for h in heldout), neg  # held-out pairs stay out of training
  assert changed == set(shapes.SHAPES)
  assert clip_train.hard_negative_captions(scenes, ("shape",), seed=0) == negs  # fixed
  both = clip_train.hard_negative_captions(scenes, ("shape", "color"), seed=1)
  words = {x.strip(".,") for objs, row in zip(scenes, both)
           for cap, neg in zip(shapes.captions(objs), row)
           for x, y in zip(cap.split(), neg.split()) if x != y}
  assert words & set(shapes.COLORS) and words & set(shapes.SHAPES)


def test_swap_attribute_checks_its_inputs():
  rng = np.random.default_rng(0)
  objs = shapes.make_scene(0, "train")
  with pytest.raises(ValueError, match="attribute='size'"):
    shapes.swap_attribute(objs, "size", "train", rng)
  with pytest.raises(ValueError, match="split='dev'"):
    shapes.swap_attribute(objs, "shape", "dev", rng)
  with pytest.raises(ValueError, match="at least one object"):
    shapes.swap_attribute([], "shape", "train", rng)
  swapped = shapes.swap_attribute(objs, "color", "train", rng)
  assert sum(o != p for o, p in zip(objs, swapped)) == 1 and objs == shapes.make_scene(0, "train")


def test_loss_decreases_under_a_few_steps(tiny):
  model, boxed, _, _ = tiny
  params = nn.unbox(boxed)
  images = jax.random.uniform(jax.random.key(3), (4, 16, 16, 3), minval=-1, maxval=1)
  ids = jnp.asarray([[5, 2, 0, 0], [9, 11, 2, 0], [13, 2, 0, 0], [17, 19, 21, 2]], jnp.int32)
  tx = optax.adam(1e-2)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt):
    def loss_fn(p):
      return clip_loss.clip_loss(*model.apply({"params": p}, images, ids))[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  losses = []
  for _ in range(5):
    params, opt, loss = step(params, opt)
    losses.append(float(loss))
  assert losses[-1] < losses[0] - 0.1, losses


def test_pool_grid():
  feats = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
  pooled = features.pool_grid(feats, 2)
  want = np.asarray(feats).reshape(2, 2, 2, 2, 3, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(pooled, want)
  assert pooled.shape == (2, 2, 2, 3)
  np.testing.assert_allclose(pooled[0, 0, 0], np.asarray(feats)[0, :2, :3].mean(axis=(0, 1)))
  with pytest.raises(ValueError, match="grid=4 .* h=4, w=6"):
    features.pool_grid(feats, 4)


def test_tokenize_pads_with_zero_and_checks():
  ids = clip_text.tokenize(["ab", "c"], lambda s: [ord(ch) - 90 for ch in s] + [2], 4)
  np.testing.assert_array_equal(ids, [[7, 8, 2, 0], [9, 2, 0, 0]])
  with pytest.raises(ValueError, match="context_len=2"):
    clip_text.tokenize(["ab"], lambda s: [3, 4, 2], 2)
  with pytest.raises(ValueError, match="pad id 0"):
    clip_text.tokenize(["ab"], lambda s: [3, 0, 2], 4)


def test_classify_by_cosine():
  class_emb = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
  img = jnp.asarray([[10.0, 1.0], [0.1, 0.5], [-3.0, -2.0], [0.2, -5.0]])
  np.testing.assert_array_equal(zero_shot.classify(img, class_emb), [0, 1, 2, 2])


def test_class_prompts_read_like_training_captions():
  prompts = zero_shot.class_prompts("shape")
  assert list(prompts) == list(shapes.SHAPES)
  assert len(prompts["star"]) == len(shapes.COLORS) * len(shapes.SIZES) * len(shapes.POSITIONS)
  assert "a small red star at the top-left." in prompts["star"]
  assert all("star" not in p for p in prompts["circle"])
  colors = zero_shot.class_prompts("color", all_templates=True)
  assert "a picture of a large pink cross at the center." in colors["pink"]


def test_zero_shot_accuracy_matches_direct_classification(tiny):
  model, boxed, _, apply = tiny
  params = nn.unbox(boxed)
  scenes = [shapes.make_scene(i, "test") for i in range(40)]
  scenes = [s for s in scenes if len(s) == 1][:5]
  images = np.stack([shapes.render(s, 16) for s in scenes])
  encode = lambda s: [ord(ch) % 120 + 3 for ch in s] + [2]  # noqa: E731
  acc = zero_shot.zero_shot_accuracy(model, params, images, scenes, encode, batch_size=256)
  img_emb = apply(params, images / 127.5 - 1.0, method="encode_image")
  embed = lambda ids: apply(params, ids, method="encode_text")  # noqa: E731
  for attr, classes in zero_shot.ATTRIBUTES.items():
    class_emb = zero_shot.class_embeddings(embed, zero_shot.class_prompts(attr), encode, 48)
    pred = np.asarray(zero_shot.classify(img_emb, class_emb))
    assert acc[attr] == np.mean(pred == [classes.index(s[0][attr]) for s in scenes])
  with pytest.raises(ValueError, match="single-object"):
    zero_shot.zero_shot_accuracy(model, params, images[:1], [scenes[0] * 2], encode)


def test_best_caption_accuracy_reads_the_argmax_caption(tiny):
  model, boxed, _, apply = tiny
  params = nn.unbox(boxed)
  scenes = [s for s in (shapes.make_scene(i, "test") for i in range(60)) if len(s) == 1][:8]
  images = np.stack([shapes.render(s, 16) for s in scenes])
  encode = lambda s: [ord(ch) % 120 + 3 for ch in s] + [2]  # noqa: E731
  acc = zero_shot.best_caption_accuracy(model, params, images, scenes, encode, batch_size=512)
  every = zero_shot.single_object_scenes()
  assert len(every) == (len(shapes.SHAPES) * len(shapes.COLORS) * len(shapes.SIZES)
                        * len(shapes.POSITIONS))
  assert all(s[0] in every for s in scenes)
  ids = clip_text.tokenize([shapes.captions([o])[0] for o in every], encode, 48)
  sims = np.einsum("NE,SE->NS",
                   *(np.asarray(clip_loss.normalize(e)) for e in (
                       apply(params, images / 127.5 - 1.0, method="encode_image"),
                       apply(params, ids, method="encode_text"))))
  best = [every[j] for j in np.argmax(sims, axis=-1)]
  for attr in zero_shot.ATTRIBUTES:
    assert acc[attr] == np.mean([b[attr] == s[0][attr] for b, s in zip(best, scenes)])
  with pytest.raises(ValueError, match="single-object"):
    zero_shot.best_caption_accuracy(model, params, images[:1], [scenes[0] * 2], encode)


def test_conv_stem_replaces_the_patchify_and_keeps_the_grid():
  cfg = clip_model.config_for("tiny", image_size=16, patch_size=4, context_len=48,
                              vocab_size=128, conv_stem=(8, 16))
  model = clip_model.CLIP(cfg)
  images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
  params = nn.unbox(model.init(jax.random.key(0), images, jnp.asarray(IDS))["params"])
  vis = params["visual"]
  assert vis["stem_0"]["kernel"].shape == (3, 3, 3, 8)
  assert vis["stem_1"]["kernel"].shape == (3, 3, 8, 16)
  assert vis["patch_embed"]["kernel"].shape == (1, 1, 16, cfg.width)  # a 1x1 conv after it
  feats = model.apply({"params": params}, images, method="patch_features")
  assert feats.shape == (2, 4, 4, cfg.width)
  # Each patch token sees its own 4x4 pixels through the stem (plus their 3x3 neighbourhoods):
  # a change in the top-left pixel moves the top-left patch's embedding, not a far one's.
  stem_out = lambda x: model.apply(  # noqa: E731
      {"params": params}, x, method=lambda m, x: m.visual.patch_embed(
          jax.nn.gelu(m.visual.stem[1](jax.nn.gelu(m.visual.stem[0](x))))))
  a, b = stem_out(images), stem_out(images.at[:, 0, 0].set(1.0 - images[:, 0, 0]))
  moved = np.abs(np.asarray(a - b)).sum(axis=(0, 3))  # [4, 4]
  assert moved[0, 0] > 0 and moved[2:, 2:].max() == 0
  for bad in ((8,), (8, 16, 32), (0, 8)):
    with pytest.raises(ValueError, match="conv_stem"):
      clip_model.config_for("tiny", image_size=16, patch_size=4, conv_stem=bad)


def test_conv_stem_is_not_an_hf_layout():
  from vlbpe_jax.clip import hf  # pylint: disable=g-import-not-at-top
  cfg = clip_model.config_for("tiny", image_size=16, patch_size=4, conv_stem=(8, 16))
  with pytest.raises(ValueError, match="conv_stem"):
    hf.key_table(cfg)


def test_twin_scenes_change_one_attribute_on_the_same_background():
  from vlbpe_jax.clip import train as clip_train  # pylint: disable=g-import-not-at-top
  examples = [shapes.make_example(i, "train", resolution=32) for i in range(60)]
  images = np.stack([e["image"] for e in examples])
  objects = [e["objects"] for e in examples]
  twin_images, twins = clip_train.twin_scenes(images, objects, ("shape",), seed=0)
  heldout = set(shapes.heldout_compositions())
  for e, img, objs in zip(examples, twin_images, twins):
    diff = [(o, p) for o, p in zip(e["objects"], objs) if o != p]
    assert len(objs) == len(e["objects"]) and len(diff) == 1
    (o, p), = diff
    assert o["shape"] != p["shape"] and {k: v for k, v in o.items() if k != "shape"} == {
        k: v for k, v in p.items() if k != "shape"}
    assert (p["color"], p["shape"]) not in heldout
    np.testing.assert_array_equal(img, shapes.render(objs, 32, background=e["background"]))
    assert not np.array_equal(img, e["image"])
  again, _ = clip_train.twin_scenes(images, objects, ("shape",), seed=0)
  np.testing.assert_array_equal(again, twin_images)  # fixed per (seed, scene)
  bad = images.copy()
  bad[3, 5, 5] = (1, 2, 3)
  with pytest.raises(ValueError, match="train image 3"):
    clip_train.twin_scenes(bad, objects, ("shape",), seed=0)
