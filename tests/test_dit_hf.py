"""diffusers Lumina-Next (BLIP3-o cross-attn) import vs an independent numpy forward.

The numpy model follows blip3o/model/lumina_nextdit2d.py with diffusers <= 0.32 pieces: NCHW
input, patch features (channel, row, column), complex interleaved 2D RoPE from
`get_2d_rotary_pos_embed_lumina`, LayerNorm QK-norm across heads, [out, in] matrices.
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy as stn

from vlbpe_jax.dit import block
from vlbpe_jax.dit import embed
from vlbpe_jax.dit import hf

CFG = dict(sample_size=4, patch_size=2, in_channels=3, hidden_size=32, num_layers=2,
           num_attention_heads=2, num_kv_heads=2, multiple_of=16, ffn_dim_multiplier=None,
           norm_eps=1e-5, learn_sigma=False, qk_norm=True, cross_attention_dim=24)
H, W = 4, 6  # a non-square grid: 2 x 3 tokens


def random_checkpoint(cfg, seed=0):
  rng = np.random.default_rng(seed)
  d, cd, p, c = (cfg[k] for k in ("hidden_size", "cross_attention_dim", "patch_size",
                                  "in_channels"))
  e, f = min(d, 1024), cfg["multiple_of"] * -(-int(2 * 4 * d / 3) // cfg["multiple_of"])
  r = lambda *s: rng.normal(0, 1 / math.sqrt(s[-1]) if len(s) == 2 else 0.3, s)  # noqa: E731
  one = lambda n: rng.normal(1, 0.1, (n,))  # noqa: E731
  w = {"patch_embedder.proj.weight": r(d, c * p * p), "patch_embedder.proj.bias": r(d),
       "caption_projection.linear_1.weight": r(d, cd), "caption_projection.linear_1.bias": r(d),
       "caption_projection.linear_2.weight": r(d, d), "caption_projection.linear_2.bias": r(d),
       "time_caption_embed.timestep_embedder.linear_1.weight": r(e, 256),
       "time_caption_embed.timestep_embedder.linear_1.bias": r(e),
       "time_caption_embed.timestep_embedder.linear_2.weight": r(e, e),
       "time_caption_embed.timestep_embedder.linear_2.bias": r(e),
       "time_caption_embed.caption_embedder.0.weight": one(d),
       "time_caption_embed.caption_embedder.0.bias": r(d),
       "time_caption_embed.caption_embedder.1.weight": r(e, d),
       "time_caption_embed.caption_embedder.1.bias": r(e),
       "norm_out.linear_1.weight": r(d, e), "norm_out.linear_1.bias": r(d),
       "norm_out.linear_2.weight": r(p * p * c, d), "norm_out.linear_2.bias": r(p * p * c)}
  for i in range(cfg["num_layers"]):
    q = f"layers.{i}."
    w[q + "gate"] = r(cfg["num_attention_heads"]) * 2
    for a in ("attn1", "attn2"):
      for n in ("q", "k", "v"):
        w[q + f"{a}.to_{n}.weight"] = r(d, d)
      for n in ("q", "k"):
        w[q + f"{a}.norm_{n}.weight"], w[q + f"{a}.norm_{n}.bias"] = one(d), r(d)
    w[q + "attn2.to_out.0.weight"] = r(d, d)
    w[q + "feed_forward.linear_1.weight"] = r(f, d)
    w[q + "feed_forward.linear_3.weight"] = r(f, d)
    w[q + "feed_forward.linear_2.weight"] = r(d, f)
    w[q + "norm1.linear.weight"], w[q + "norm1.linear.bias"] = r(4 * d, e), r(4 * d)
    for n in ("norm1.norm", "norm2", "ffn_norm1", "ffn_norm2", "norm1_context"):
      w[q + n + ".weight"] = one(d)
  return {k: v.astype(np.float32) for k, v in w.items()}


def save(path, weights, cfg=CFG, prefix=""):
  os.makedirs(path, exist_ok=True)
  stn.save_file({prefix + k: v for k, v in weights.items()},
                os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json"), "w") as fh:
    json.dump(cfg, fh)
  return str(path)


# ---- independent numpy reference (torch semantics) ----

def lin(x, w, pre, bias=True):
  y = x @ w[pre + ".weight"].T
  return y + w[pre + ".bias"] if bias else y


def rms(x, g, eps=1e-5):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g


def layer_norm(x, g=None, b=None, eps=1e-5):
  y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
  return y if g is None else y * g + b


silu = lambda x: x / (1 + np.exp(-x))  # noqa: E731


def freqs_cis(k, h, w, theta=10000.0):
  """get_2d_rotary_pos_embed_lumina: [h*w, K/2] complex, pairs alternate row / column."""
  f = 1.0 / theta ** (np.arange(0, k // 2, 2)[: k // 4] / (k // 2))  # [K/4]
  emb_h = np.exp(1j * np.outer(np.arange(h), f))  # [h, K/4]
  emb_w = np.exp(1j * np.outer(np.arange(w), f))
  out = np.stack([np.repeat(emb_h[:, None], w, 1), np.repeat(emb_w[None], h, 0)], -1)
  return out.reshape(h * w, k // 2)


def rotate(x, fc):  # x [B, T, N, K], complex pairs (2m, 2m+1)
  xc = (x[..., 0::2] + 1j * x[..., 1::2]) * fc[None, :, None]
  return np.stack([xc.real, xc.imag], -1).reshape(x.shape)


def attention(w, pre, x, ctx, heads, fc, mask, rope_k):
  b, t, _ = x.shape
  q = layer_norm(lin(x, w, pre + ".to_q", False), w[pre + ".norm_q.weight"],
                 w[pre + ".norm_q.bias"])
  k = layer_norm(lin(ctx, w, pre + ".to_k", False), w[pre + ".norm_k.weight"],
                 w[pre + ".norm_k.bias"])
  v = lin(ctx, w, pre + ".to_v", False)
  q, k, v = (a.reshape(b, a.shape[1], heads, -1) for a in (q, k, v))
  q = rotate(q, fc)
  if rope_k:
    k = rotate(k, fc)
  s = np.einsum("BTNK,BSNK->BNTS", q, k) / math.sqrt(q.shape[-1])
  s = np.where(mask[:, None, None, :], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("BNTS,BSNK->BTNK", p, v)  # no output projection (LuminaAttnProcessor)


def np_block(w, i, x, y, y_mask, temb, fc, heads):
  q = f"layers.{i}."
  m = lin(silu(temb), w, q + "norm1.linear")
  scale_msa, gate_msa, scale_mlp, gate_mlp = np.split(m, 4, axis=1)
  h = rms(x, w[q + "norm1.norm.weight"]) * (1 + scale_msa[:, None])
  a1 = attention(w, q + "attn1", h, h, heads, fc, np.ones(x.shape[:2], bool), True)
  yn = rms(y, w[q + "norm1_context.weight"])
  a2 = attention(w, q + "attn2", h, yn, heads, fc, y_mask, False)
  a = (a1 + a2 * np.tanh(w[q + "gate"])[None, None, :, None]).reshape(x.shape)
  a = a @ w[q + "attn2.to_out.0.weight"].T
  x = x + np.tanh(gate_msa)[:, None] * rms(a, w[q + "norm2.weight"])
  g = rms(x, w[q + "ffn_norm1.weight"]) * (1 + scale_mlp[:, None])
  ff = (silu(g @ w[q + "feed_forward.linear_1.weight"].T) *
        (g @ w[q + "feed_forward.linear_3.weight"].T)) @ w[q + "feed_forward.linear_2.weight"].T
  return x + np.tanh(gate_mlp)[:, None] * rms(ff, w[q + "ffn_norm2.weight"])


def np_embed(w, t, cond, cond_mask):
  y = lin(cond, w, "caption_projection.linear_1")
  y = 0.5 * y * (1 + np.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y ** 3)))
  y = lin(y, w, "caption_projection.linear_2")
  # diffusers `Timesteps` runs in float32; at t ~ 1000 its rounding is visible downstream.
  freqs = np.exp(np.float32(-math.log(10000)) * np.arange(128, dtype=np.float32) / 128)
  args = t.astype(np.float32)[:, None] * freqs
  tf = np.concatenate([np.cos(args), np.sin(args)], -1).astype(np.float64)
  te = lin(silu(lin(tf, w, "time_caption_embed.timestep_embedder.linear_1")), w,
           "time_caption_embed.timestep_embedder.linear_2")
  m = cond_mask.astype(np.float64)[..., None]
  pooled = (y * m).sum(1) / m.sum(1)
  pooled = layer_norm(pooled, w["time_caption_embed.caption_embedder.0.weight"],
                      w["time_caption_embed.caption_embedder.0.bias"])
  return y, te + lin(pooled, w, "time_caption_embed.caption_embedder.1")


def np_forward(w, cfg, x_nhwc, t, cond, cond_mask):
  x = x_nhwc.transpose(0, 3, 1, 2)  # NCHW, as the torch model takes it
  b, c, hh, ww = x.shape
  p, heads = cfg["patch_size"], cfg["num_attention_heads"]
  h, wt = hh // p, ww // p
  x = x.reshape(b, c, h, p, wt, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, h * wt, c * p * p)
  x = lin(x, w, "patch_embedder.proj")
  y, temb = np_embed(w, t, cond, cond_mask)
  fc = freqs_cis(cfg["hidden_size"] // heads, h, wt)
  for i in range(cfg["num_layers"]):
    x = np_block(w, i, x, y, cond_mask, temb, fc, heads)
  x = layer_norm(x, eps=1e-6) * (1 + lin(silu(temb), w, "norm_out.linear_1"))[:, None]
  x = lin(x, w, "norm_out.linear_2")
  out = x.reshape(b, h, wt, p, p, c).transpose(0, 5, 1, 3, 2, 4).reshape(b, c, hh, ww)
  return out.transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
  w = random_checkpoint(CFG)
  path = save(tmp_path_factory.mktemp("dit"), w)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, H, W, 3)).astype(np.float32)
  t = np.array([1000.0, 333.0], np.float32)
  cond = rng.normal(size=(2, 5, 24)).astype(np.float32)
  mask = np.array([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1]], bool)
  return w, path, (x, t, cond, mask)


def test_one_block_matches_numpy(case):
  w, path, (x, t, cond, mask) = case
  model, params = hf.load_nextdit(path)
  c = model.config
  rng = np.random.default_rng(2)
  tokens = rng.normal(size=(2, 6, 32)).astype(np.float32)
  y = rng.normal(size=(2, 5, 32)).astype(np.float32)
  temb = rng.normal(size=(2, 32)).astype(np.float32)
  cos, sin = embed.grid_rope(2, 3, c.head_dim)
  ours, _ = jax.jit(block.Block(c.heads, c.ffn_dim).apply)(
      {"params": params["layers_1"]}, tokens, y, mask, temb, cos, sin)
  want = np_block(w, 1, tokens.astype(np.float64), y, mask, temb, freqs_cis(c.head_dim, 2, 3),
                  c.heads)
  np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_full_forward_matches_numpy(case, scan):
  w, path, (x, t, cond, mask) = case
  model, params = hf.load_nextdit(path, scan_layers=scan)
  ours = jax.jit(model.apply)({"params": params}, x, t, cond, mask)
  want = np_forward({k: v.astype(np.float64) for k, v in w.items()}, CFG,
                    x.astype(np.float64), t.astype(np.float64), cond.astype(np.float64), mask)
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(ours, want, rtol=1e-5, atol=5e-5)  # max |want| ~ 4


def test_blip3o_spelling_and_prefix(case, tmp_path):
  w, _, (x, t, cond, mask) = case
  blip = dict(input_size=4, patch_size=2, in_channels=3, dim=32, n_layers=2, n_heads=2,
              n_kv_heads=2, multiple_of=16, norm_eps=1e-5, latent_embedding_size=24,
              learn_sigma=False, qk_norm=True)
  path = save(tmp_path / "b", w, cfg=blip, prefix="model.dit.model.")
  model, params = hf.load_nextdit(path, dtype=jnp.bfloat16)
  assert model.config.grid == (4, 4) and model.config.cond_dim == 24
  assert params["layers_0"]["attn"]["self_q"].dtype == jnp.bfloat16


def test_bad_checkpoints_name_every_problem(case, tmp_path):
  w, _, _ = case
  bad = dict(w)
  del bad["layers.0.gate"]
  bad["layers.1.attn2.to_k.weight"] = np.zeros((32, 24), np.float32)
  bad["layers.1.attn2.to_out.0.bias"] = np.zeros((32,), np.float32)
  with pytest.raises(ValueError) as e:
    hf.load_nextdit(save(tmp_path / "bad", bad))
  msg = str(e.value)
  assert "layers.0.gate missing" in msg
  assert "layers.1.attn2.to_k.weight has shape (32, 24); expected (32, 32)" in msg
  assert "layers.1.attn2.to_out.0.bias" in msg
  with pytest.raises(ValueError, match="learn_sigma"):
    hf.load_nextdit(save(tmp_path / "ls", w, cfg=dict(CFG, learn_sigma=True)))
  with pytest.raises(ValueError, match="num_kv_heads=1"):
    hf.load_nextdit(save(tmp_path / "kv", w, cfg=dict(CFG, num_kv_heads=1)))
