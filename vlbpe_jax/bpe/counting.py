"""First-round pair counts of base-code grids: jitted, sharded over the mesh's data axis.

Before any merge every token is one cell, so two tokens are neighbours exactly when their cells
differ by a window offset. Each device turns its shard of grids into pair keys
`(a * vcap + b, d)`; the keys are sorted and run-length counted across the mesh (XLA inserts the
collectives); integer counts make the result identical on any mesh. Padding grids (added so N
splits over the devices) hold -1 and their pairs sort last and are dropped.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vlbpe_jax import parallel

_PAD = np.iinfo(np.int32).max


@functools.partial(jax.jit, static_argnames=("offsets", "vcap"))
def _pair_runs(grids, offsets, vcap):
  """grids: [N, H, W] int32 (-1 = padding). Returns sorted unique (ab, d), counts, #unique."""
  _, h, w = grids.shape
  abs_, ds = [], []
  for dy, dx in offsets:
    x0, x1 = max(0, -dx), w - max(0, dx)
    a = grids[:, :h - dy, x0:x1]
    b = grids[:, dy:, x0 + dx:x1 + dx]
    ab = jnp.where((a >= 0) & (b >= 0), a * vcap + b, _PAD).reshape(-1)
    abs_.append(ab)
    ds.append(jnp.full(ab.shape, dy * (2 * w - 1) + dx + w - 1, jnp.int32))
  ab, d = jax.lax.sort((jnp.concatenate(abs_), jnp.concatenate(ds)), num_keys=2)
  new = jnp.concatenate([jnp.ones(1, bool), (ab[1:] != ab[:-1]) | (d[1:] != d[:-1])])
  seg = jnp.cumsum(new) - 1                               # [P] run index
  counts = jax.ops.segment_sum(jnp.ones_like(ab), seg, num_segments=ab.size)
  uab = jnp.full_like(ab, _PAD).at[seg].set(ab)
  ud = jnp.zeros_like(d).at[seg].set(d)
  return uab, ud, counts


def count_base_pairs_host(grids: np.ndarray, offsets, vcap: int):
  """`count_base_pairs` with numpy on the host (faster than XLA's CPU sort on one CPU)."""
  _, h, w = grids.shape
  keys = []
  for dy, dx in offsets:
    x0, x1 = max(0, -dx), w - max(0, dx)
    a = grids[:, :h - dy, x0:x1].astype(np.int64)
    b = grids[:, dy:, x0 + dx:x1 + dx]
    keys.append(((a * vcap + b) * (h * (2 * w - 1)) + dy * (2 * w - 1) + dx + w - 1).ravel())
  keys, counts = np.unique(np.concatenate(keys), return_counts=True)
  return keys, counts.astype(np.int64)


def count_base_pairs(grids: np.ndarray, offsets, vcap: int, mesh=None):
  """Exact counts of `(a, b, d)` over base grids; keys `(a * vcap + b) * D + d`, sorted.

  grids: int32 [N, H, W]; offsets: raster-forward window; D = H * (2W - 1). Without a mesh
  the jitted count runs on the default device. Returns (keys int64 [U], counts int64 [U]).
  """
  if vcap * vcap >= _PAD:
    raise ValueError(f"vocabulary capacity {vcap} (base + merges): expected < 46341 so that "
                     "pair ids fit int32")
  n, h, w = grids.shape
  grids = np.asarray(grids, np.int32)
  if mesh is None:
    uab, ud, counts = _pair_runs(grids, tuple(offsets), vcap)
  else:
    shards = int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.axis_names]))
    pad = -n % shards
    grids = np.concatenate([grids, np.full((pad, h, w), -1, np.int32)])
    with jax.set_mesh(mesh):
      x = jax.device_put(grids, parallel.batch_sharding(mesh, 3))
      fn = jax.jit(_pair_runs.__wrapped__, static_argnames=("offsets", "vcap"),
                   out_shardings=parallel.replicated(mesh))
      uab, ud, counts = fn(x, tuple(offsets), vcap)
  uab, ud, counts = np.asarray(uab), np.asarray(ud), np.asarray(counts)
  keep = uab != _PAD
  keys = uab[keep].astype(np.int64) * (h * (2 * w - 1)) + ud[keep]
  return keys, counts[keep].astype(np.int64)
