"""DiT (Lumina-Next with BLIP3-o's gated cross-attention): shapes, init, gates, layouts, RoPE."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlbpe_jax import parallel
from vlbpe_jax.dit import embed
from vlbpe_jax.dit import model as dit_model
from vlbpe_jax.lm import layers

B, Q = 2, 5


def _inputs(c, key=0):
  ks = jax.random.split(jax.random.key(key), 3)
  x = jax.random.normal(ks[0], (B, c.grid[0], c.grid[1], c.in_channels))
  cond = jax.random.normal(ks[1], (B, Q, c.cond_dim))
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  return x, jnp.array([1000.0, 250.0]), cond, mask


def _perturb(params, seed, skip=("cross_gate",)):
  """Every zero-initialised param random (as after training), except those named in skip."""
  rng = np.random.default_rng(seed)
  leaves, tree = jax.tree_util.tree_flatten_with_path(params)
  out = []
  for path, x in leaves:
    name = "/".join(str(p.key) for p in path)
    x = np.asarray(x)
    if not x.any() and not any(s in name for s in skip):
      x = 0.3 * rng.standard_normal(x.shape).astype(np.float32)
    out.append(x)
  return jax.tree_util.tree_unflatten(tree, out)


@pytest.fixture(scope="module")
def tiny():
  c = dit_model.config_for("tiny", grid=(4, 6), patch_size=2, in_channels=3, cond_dim=12)
  m = dit_model.DiT(c)
  x, t, cond, mask = _inputs(c)
  params = nn.unbox(jax.jit(m.init)(jax.random.key(1), x, t, cond, mask)["params"])
  return c, _Jitted(m), params


class _Jitted:
  """The module with a jitted apply (one compilation per test module)."""

  def __init__(self, m):
    self.apply = jax.jit(m.apply)


def test_shape_and_zero_output_at_init(tiny):
  c, m, params = tiny
  x, t, cond, mask = _inputs(c)
  v = m.apply({"params": params}, x, t, cond, mask)
  assert v.shape == x.shape and v.dtype == jnp.float32
  np.testing.assert_array_equal(v, 0.0)  # zero-initialised final Linear (adaLN-zero DiT)
  assert not np.any(params["layers_0"]["attn"]["cross_gate"])


def test_cross_gate_init_option():
  c = dit_model.config_for("tiny", grid=(4, 4), in_channels=3, cond_dim=12, cross_gate_init=0.5)
  x, t, cond, mask = _inputs(c)
  params = nn.unbox(dit_model.DiT(c).init(jax.random.key(1), x, t, cond, mask)["params"])
  for i in range(c.depth):
    np.testing.assert_array_equal(params[f"layers_{i}"]["attn"]["cross_gate"], 0.5)


def test_cond_enters_only_through_pool_while_gate_is_zero(tiny):
  """With the cross-attention gates at 0, cond reaches the output only via temb's pooled mean:
  zeroing the pooled projection makes the output independent of cond; opening a gate or the
  pooled projection makes it depend on cond."""
  c, m, params = tiny
  x, t, cond, mask = _inputs(c)
  cond2 = cond + jax.random.normal(jax.random.key(7), cond.shape)
  p = _perturb(params, 3)
  p["cap_pool"] = jax.tree.map(jnp.zeros_like, p["cap_pool"])
  run = lambda p, cd: m.apply({"params": p}, x, t, cd, mask)  # noqa: E731
  np.testing.assert_allclose(run(p, cond), run(p, cond2), atol=1e-6)
  opened = jax.tree.map(lambda a: a, p)
  opened["layers_1"]["attn"]["cross_gate"] = jnp.full((c.heads,), 0.5)
  assert np.abs(run(opened, cond) - run(opened, cond2)).max() > 1e-3
  pooled = _perturb(params, 3)
  assert np.abs(run(pooled, cond) - run(pooled, cond2)).max() > 1e-3


def test_cross_gate_gradient_nonzero_at_zero(tiny):
  c, m, params = tiny
  x, t, cond, mask = _inputs(c)
  p = _perturb(params, 4)

  def loss(p):
    return jnp.sum(m.apply({"params": p}, x, t, cond, mask) ** 2)

  g = jax.jit(jax.grad(loss))(p)
  for i in range(c.depth):
    assert np.all(np.abs(g[f"layers_{i}"]["attn"]["cross_gate"]) > 0)


def test_masked_cond_positions_are_ignored(tiny):
  c, m, params = tiny
  x, t, cond, mask = _inputs(c)
  p = _perturb(params, 5, skip=())
  other = cond.at[0, 3:].set(100.0)  # row 0 masks positions 3, 4
  np.testing.assert_allclose(m.apply({"params": p}, x, t, cond, mask),
                             m.apply({"params": p}, x, t, other, mask), atol=1e-5)


def test_scan_and_remat_match_unrolled(tiny):
  c, m, params = tiny
  x, t, cond, mask = _inputs(c)
  p = _perturb(params, 6, skip=())
  sc = dit_model.DiT(dit_model.config_for("tiny", grid=(4, 6), patch_size=2, in_channels=3,
                                          cond_dim=12, scan_layers=True, remat_policy="full"))
  stacked = {k: v for k, v in p.items() if not k.startswith("layers_")}
  stacked["layers"] = jax.tree.map(lambda *a: jnp.stack(a), p["layers_0"], p["layers_1"])
  np.testing.assert_allclose(jax.jit(sc.apply)({"params": stacked}, x, t, cond, mask),
                             m.apply({"params": p}, x, t, cond, mask), atol=1e-5)


def test_patchify_round_trip_and_bad_grid(tiny):
  c, m, params = tiny
  x = jax.random.normal(jax.random.key(0), (2, 4, 6, 3))
  pt = embed.patchify(x, 2)
  assert pt.shape == (2, 2, 3, 12)
  np.testing.assert_array_equal(pt[0, 1, 2], x[0, 2:4, 4:6].reshape(-1))  # (row, col, channel)
  np.testing.assert_array_equal(embed.unpatchify(pt, 2), x)
  with pytest.raises(ValueError, match="patch_size=2"):
    m.apply({"params": params}, jnp.zeros((2, 5, 6, 3)), *_inputs(c)[1:])


def test_rope_logits_depend_only_on_offset():
  k, h, w = 16, 5, 4
  cos, sin = embed.grid_rope(h, w, k)
  q = jnp.broadcast_to(jax.random.normal(jax.random.key(0), (k,)), (1, h * w, 1, k))
  kk = jnp.broadcast_to(jax.random.normal(jax.random.key(1), (k,)), (1, h * w, 1, k))
  logits = np.einsum("TK,SK->TS", layers.apply_rope(q, cos, sin)[0, :, 0],
                     layers.apply_rope(kk, cos, sin)[0, :, 0]).reshape(h, w, h, w)
  for (r1, c1, r2, c2) in [(0, 0, 1, 2), (3, 1, 0, 3), (2, 2, 2, 0)]:
    for dr, dc in [(1, 0), (0, 1), (1, 1)]:
      if max(r1, r2) + dr < h and max(c1, c2) + dc < w:
        np.testing.assert_allclose(logits[r1 + dr, c1 + dc, r2 + dr, c2 + dc],
                                   logits[r1, c1, r2, c2], rtol=1e-4, atol=1e-4)
  assert abs(logits[0, 0, 1, 0] - logits[0, 0, 0, 1]) > 1e-3  # rows and columns differ


def test_config_errors_and_blip3o_size():
  with pytest.raises(ValueError, match="variant='XL'"):
    dit_model.config_for("XL")
  with pytest.raises(ValueError, match="widht"):
    dit_model.config_for("tiny", widht=3)
  with pytest.raises(ValueError, match="multiple of 4"):
    dit_model.config_for("tiny", heads=32)  # head dim 2
  with pytest.raises(ValueError, match="remat_policy"):
    dit_model.config_for("tiny", remat_policy="some")
  c = dit_model.config_for("blip3o")
  assert (c.dim, c.depth, c.heads, c.grid, c.patch_size, c.ffn_dim) == (
      1792, 24, 28, (8, 8), 1, 4864)
  shapes = jax.eval_shape(dit_model.DiT(c).init, jax.random.key(0), jnp.zeros((1, 8, 8, 1792)),
                          jnp.zeros((1,)), jnp.zeros((1, 64, 3584)), jnp.ones((1, 64), bool))
  count = sum(x.size for x in jax.tree.leaves(nn.unbox(shapes["params"])))
  assert 1.36e9 < count < 1.37e9  # BLIP3-o's DiT: ~1.36B


def test_sharded_forward_matches_unsharded(tiny):
  """Params born sharded on a 2x2x2 mesh by their logical names; same output as unsharded."""
  c, m, params = tiny
  x, t, cond, mask = _inputs(c)
  p = _perturb(params, 8, skip=())
  model = dit_model.DiT(c)
  mesh = parallel.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
    abstract = jax.eval_shape(model.init, jax.random.key(1), x, t, cond, mask)["params"]
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh,
                                            parallel.LOGICAL_AXIS_RULES)
    assert tuple(shardings["layers_0"]["attn"]["self_q"].spec) == ("fsdp", "tensor", None)
    sharded = jax.device_put(p, shardings)
    out = jax.jit(model.apply)({"params": sharded}, x, t, cond, mask)
  # Sharded matmuls sum in another order: float32 rounding, relative (CI: 1.6e-6 at 7.79).
  np.testing.assert_allclose(out, m.apply({"params": p}, x, t, cond, mask), rtol=1e-5,
                             atol=1e-5)
