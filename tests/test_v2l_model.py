"""V2L tokenizer: LM-id codes, projector-only codebook, straight-through, global cross-attn."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlbpe_jax.v2l import codebook
from vlbpe_jax.v2l import losses
from vlbpe_jax.v2l import model as model_lib
from vlbpe_jax.v2l import quantizer
from vlbpe_jax.vq import discriminator
import v2l_helpers

CFG = model_lib.config_for("tiny")
KG = 3  # global tokens per image


@pytest.fixture(scope="module")
def setup():
  tok = v2l_helpers.tokenizer()
  clip, clip_params = v2l_helpers.clip(CFG.embed_dim)
  lm_ids, texts = codebook.subword_texts(tok)
  local_emb = codebook.embed_texts(clip, clip_params, texts, v2l_helpers.encode,
                                   ("a photo of a {}.",), batch_size=len(texts))
  model = model_lib.V2LTokenizer(CFG)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(2, KG, CFG.embed_dim)), jnp.float32)
  mask = jnp.ones((2, KG), bool)
  boxed = jax.jit(model.init)(v2l_helpers.key(0), x, jnp.asarray(local_emb), g, mask)["params"]
  return dict(tok=tok, clip=clip, clip_params=clip_params, lm_ids=lm_ids, texts=texts,
              local_emb=jnp.asarray(local_emb), model=model, boxed=boxed,
              params=nn.unbox(boxed), x=x, g=g, mask=mask)


def _apply(s, *args, method=None):
  fn = jax.jit(lambda p, *a: s["model"].apply({"params": p}, *a, method=method))
  return fn(s["params"], *args)


def test_projector_is_the_only_codebook_param_and_names(setup):
  params = setup["params"]
  assert set(params) == {"encoder", "quant_conv", "projector", "post_quant_conv", "decoder"}
  v, e = setup["local_emb"].shape
  assert params["projector"]["kernel"].shape == (e, CFG.code_dim)
  assert not any(leaf.shape[:1] == (v,) for leaf in jax.tree.leaves(params))  # no [V, ...] table
  leaves = jax.tree.leaves(setup["boxed"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.Partitioned) for x in leaves)
  assert "mid_cross_attn" in params["decoder"] and CFG.downsample == 4 and CFG.grid == 4


def test_codes_are_codebook_rows_and_real_lm_ids(setup):
  s = setup
  model = s["model"]

  @jax.jit
  def run(p, x, table, g, mask):
    ap = lambda *a, method=None: model.apply({"params": p}, *a, method=method)
    z_q, idx, loss, aux = ap(x, table, method="encode")
    x_rec, train_aux = ap(x, table, g, mask)
    dec = ap(idx, table, g, mask, method="decode_ids")  # restoration's path
    return z_q, idx, loss, aux, ap(table, method="codebook"), x_rec, train_aux, dec

  z_q, idx, loss, aux, book, x_rec, train_aux, dec = run(s["params"], s["x"], s["local_emb"],
                                                          s["g"], s["mask"])
  assert idx.shape == (2, 4, 4) and idx.dtype == jnp.int32 and np.isfinite(loss)
  np.testing.assert_array_equal(np.asarray(z_q), np.asarray(book)[np.asarray(idx)])
  np.testing.assert_allclose(np.linalg.norm(aux["z"], axis=-1), 1.0, rtol=1e-5)
  ids = s["lm_ids"][np.asarray(idx)]
  for i, local in zip(ids.reshape(-1), np.asarray(idx).reshape(-1)):
    assert s["tok"].piece_type(i) == "normal"
    assert s["tok"].decode([int(i)]) == s["texts"][local]
  # The same indices decode to the training path's images.
  np.testing.assert_array_equal(np.asarray(train_aux["idx"]), np.asarray(idx))
  np.testing.assert_allclose(np.asarray(dec), np.asarray(x_rec), rtol=1e-5, atol=1e-5)


def test_straight_through_and_loss_placement():
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.normal(size=(1, 2, 2, 4)), jnp.float32)
  book = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
  c = jnp.asarray(rng.normal(size=(1, 2, 2, 4)), jnp.float32)
  z_q, idx, loss, _ = quantizer.quantize_local(z, book)
  np.testing.assert_array_equal(np.asarray(z_q), np.asarray(book)[np.asarray(idx)])
  # The decoder's gradient reaches z as if z_q were normalize(z) (straight-through) ...
  g_st = jax.grad(lambda z: jnp.sum(quantizer.quantize_local(z, book)[0] * c))(z)
  g_id = jax.grad(lambda z: jnp.sum(quantizer.normalize(z) * c))(z)
  np.testing.assert_allclose(np.asarray(g_st), np.asarray(g_id), rtol=1e-5, atol=1e-7)
  # ... and never the codebook; the q-loss pulls the encoder with 1, the codebook with 0.33.
  g_book = jax.grad(lambda b: jnp.sum(quantizer.quantize_local(z, b)[0] * c))(book)
  assert not np.any(np.asarray(g_book))
  e, zn = np.asarray(book)[np.asarray(idx)], np.asarray(quantizer.normalize(z))
  np.testing.assert_allclose(float(loss), 1.33 * np.mean((e - zn) ** 2), rtol=1e-5)
  g_z = jax.grad(lambda b: quantizer.quantize_local(z, b)[2])(book)
  d_book = np.zeros_like(np.asarray(book))
  np.add.at(d_book, np.asarray(idx).reshape(-1), (0.33 * 2 * (e - zn) / zn.size).reshape(-1, 4))
  np.testing.assert_allclose(np.asarray(g_z), d_book, rtol=1e-4, atol=1e-7)


def test_global_tokens_and_mask(setup):
  s = setup
  z_q, _, _, _ = _apply(s, s["x"], s["local_emb"], method="encode")
  dec = lambda g, m: np.asarray(_apply(s, z_q, g, m, method="decode"))
  g2 = s["g"].at[:, 0].set(jnp.asarray(np.random.default_rng(9).normal(size=(2, 16)),
                                       jnp.float32))
  base = dec(s["g"], s["mask"])
  assert np.abs(dec(g2, s["mask"]) - base).max() > 1e-4  # global tokens matter
  part = s["mask"].at[:, 0].set(False)
  np.testing.assert_allclose(dec(g2, part), dec(s["g"], part), atol=1e-6)  # masked: ignored
  none = jnp.zeros_like(s["mask"])
  off = dec(s["g"], none)
  np.testing.assert_allclose(dec(g2 * 5.0, none), off, atol=1e-6)
  assert np.abs(off - base).max() > 1e-4


def test_train_step_moves_v2l_only_clip_and_table_bit_identical(setup):
  s = setup
  clip, model, lm_ids = s["clip"], s["model"], s["lm_ids"]
  entry_emb = s["local_emb"][:7]  # stand-in global entries (frozen CLIP text rows)
  disc = discriminator.PatchDiscriminator(ndf=4, n_layers=1)
  disc_params = nn.unbox(jax.jit(disc.init)(v2l_helpers.key(5), s["x"]))["params"]
  cfg = losses.LossConfig(disc_start=0)
  images8 = jax.image.resize(s["x"], (2, 8, 8, 3), "linear")  # the tiny CLIP's input size

  def loss_fn(trainable, table):
    img = clip.apply({"params": trainable["clip"]}, images8, method="encode_image")
    tokens = codebook.global_tokens(img, entry_emb, KG)  # [B, Kg]
    g = jnp.take(entry_emb, tokens, axis=0)  # [B, Kg, E]
    (x_rec, aux), inter = model.apply({"params": trainable["v2l"]}, s["x"], table, g,
                                      jnp.ones(tokens.shape, bool), mutable=["intermediates"])
    return losses.generator_loss(
        s["x"], x_rec, aux["quant_loss"], jnp.asarray(1), cfg=cfg,
        disc_fn=lambda y: disc.apply({"params": disc_params}, y),
        features=losses.decoder_features(inter),
        conv_out_params=trainable["v2l"]["decoder"]["conv_out"], patch=CFG.patch)

  trainable = {"v2l": s["params"], "clip": s["clip_params"]}
  before = jax.tree.map(np.array, trainable)
  table = s["local_emb"]
  tx = optax.adam(1e-3, b1=0.5, b2=0.9)

  @jax.jit
  def step(t, opt):
    (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(t, table)
    updates, opt = tx.update(grads, opt, t)
    return optax.apply_updates(t, updates), grads, m

  after, grads, m = step(trainable, tx.init(trainable))
  assert np.isfinite(m["loss"]) and m["adaptive_weight"] > 0 and "g_loss" in m
  # CLIP reaches the loss only through the discrete top-k choice: zero gradient, no update.
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(grads["clip"]))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, after["clip"]),
               before["clip"])
  np.testing.assert_array_equal(np.asarray(table), np.asarray(s["local_emb"]))
  moved = lambda k: not np.array_equal(np.asarray(after["v2l"][k]["kernel"]),
                                       before["v2l"][k]["kernel"])
  assert moved("projector") and moved("quant_conv")
  assert np.any(np.asarray(grads["v2l"]["encoder"]["conv_in"]["kernel"]))
  assert lm_ids.shape[0] == table.shape[0]


def test_losses_without_gan_and_delayed_start():
  x = jnp.zeros((1, 4, 4, 3))
  y = jnp.full((1, 4, 4, 3), 0.5)
  cfg = losses.LossConfig(quant_weight=2.0, disc_start=5)
  loss, m = losses.generator_loss(x, y, jnp.asarray(0.25), 0, cfg=cfg)
  assert float(loss) == pytest.approx(0.5 + 2.0 * 0.25) and "g_loss" not in m
  real, fake = jnp.ones((1, 2, 2, 1)), -jnp.ones((1, 2, 2, 1))
  assert float(losses.discriminator_loss(real, fake, 4, cfg=cfg)) == 0.0
  assert float(losses.discriminator_loss(-real, -fake, 5, cfg=cfg)) == pytest.approx(2.0)
  with pytest.raises(ValueError, match="needs features"):
    losses.generator_loss(x, y, 0.0, 0, cfg=cfg, disc_fn=lambda z: z)


def test_bad_inputs_raise(setup):
  s = setup
  with pytest.raises(ValueError, match="image_size=18 is not divisible by the downsampling 4"):
    model_lib.config_for("tiny", image_size=18)
  with pytest.raises(ValueError, match="variant='huge'"):
    model_lib.config_for("huge")
  with pytest.raises(ValueError, match="widht"):
    model_lib.config_for("tiny", widht=3)
  with pytest.raises(ValueError, match="embed_dim=16"):
    s["model"].apply({"params": s["params"]}, s["local_emb"][:, :8], method="codebook")
  with pytest.raises(ValueError, match="divisible by the downsampling 4"):
    s["model"].apply({"params": s["params"]}, s["x"][:, :14, :14], s["local_emb"],
                     method="encode")
  assert model_lib.config_for("paper").grid == 16 and model_lib.config_for("demo").grid == 16


def test_decoders_share_one_body_and_check_their_inputs():
  """V2LDecoder is the VQ decoder plus `mid_cross_attn`: the same other parameters, and each
  refuses the other's inputs."""
  from vlbpe_jax.v2l import decoder as v2l_decoder  # pylint: disable=g-import-not-at-top
  from vlbpe_jax.vq import autoencoder  # pylint: disable=g-import-not-at-top
  kw = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, groups=4)
  z = jnp.ones((1, 2, 2, 4))
  g, m = jnp.ones((1, 3, 6)), jnp.ones((1, 3), bool)
  vq_params = autoencoder.Decoder(**kw).init(jax.random.key(0), z)["params"]
  v2l = v2l_decoder.V2LDecoder(cross_heads=2, **kw)
  v2l_params = v2l.init(jax.random.key(0), z, g, m)["params"]
  assert set(v2l_params) == set(vq_params) | {"mid_cross_attn"}
  with pytest.raises(ValueError, match="takes one input"):
    autoencoder.Decoder(**kw).apply({"params": vq_params}, z, g)
  with pytest.raises(ValueError, match="global_emb, global_mask"):
    v2l.apply({"params": v2l_params}, z, g)
