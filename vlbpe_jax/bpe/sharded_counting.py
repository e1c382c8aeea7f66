"""First-round pair counts of base-code grids: jitted, sharded over the mesh's batch axes.

Before any merge every token is one cell, so two tokens are neighbours exactly when their cells
differ by a window offset. With a mesh, each device turns its shard of grids into pair keys
`(a * vcap + b, d)`, sorts and run-length counts them (`_runs`), and the per-device
(key, count) lists are combined with an `all_gather` collective and summed per key (sorted
again, `segment_sum`). Integer counts make the result identical on any mesh and equal to the
host count (`counting.count_base_pairs_host`, which needs no jax). Padding grids (added so N
splits over the devices) hold -1; their pairs carry the key `_PAD`, sort last and are dropped.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

_PAD = np.iinfo(np.int32).max


def _runs(ab, d, n):
  """Sorted unique (ab, d) with summed counts n; fixed size (unused tail: ab = _PAD, n = 0)."""
  ab, d, n = jax.lax.sort((ab, d, n), num_keys=2)
  new = jnp.concatenate([jnp.ones(1, bool), (ab[1:] != ab[:-1]) | (d[1:] != d[:-1])])
  seg = jnp.cumsum(new) - 1                                 # [P] run index
  counts = jax.ops.segment_sum(jnp.where(ab == _PAD, 0, n), seg, num_segments=ab.size)
  return (jnp.full_like(ab, _PAD).at[seg].set(ab), jnp.zeros_like(d).at[seg].set(d), counts)


def _pair_runs(grids, offsets, vcap):
  """grids: [N, H, W] int32 (-1 = padding) -> `_runs` of all their neighbouring pairs."""
  _, h, w = grids.shape
  abs_, ds = [], []
  for dy, dx in offsets:
    x0, x1 = max(0, -dx), w - max(0, dx)
    a = grids[:, :h - dy, x0:x1]
    b = grids[:, dy:, x0 + dx:x1 + dx]
    ab = jnp.where((a >= 0) & (b >= 0), a * vcap + b, _PAD).reshape(-1)
    abs_.append(ab)
    ds.append(jnp.full(ab.shape, dy * (2 * w - 1) + dx + w - 1, jnp.int32))
  ab = jnp.concatenate(abs_)
  return _runs(ab, jnp.concatenate(ds), jnp.ones_like(ab))


@functools.partial(jax.jit, static_argnames=("offsets", "vcap", "mesh", "axes"))
def _sharded_pair_runs(grids, offsets, vcap, mesh, axes):
  def per_device(g):  # [N / devices, H, W] -> the same combined runs on every device
    local = _pair_runs(g, offsets, vcap)
    return _runs(*(jax.lax.all_gather(x, axes, tiled=True) for x in local))

  return jax.shard_map(per_device, mesh=mesh, in_specs=P(axes), out_specs=P(),
                       check_vma=False)(grids)


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
    uab, ud, counts = jax.jit(_pair_runs, static_argnames=("offsets", "vcap"))(
        grids, tuple(offsets), vcap)
  else:
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
    shards = int(np.prod([mesh.shape[a] for a in axes]))
    grids = np.concatenate([grids, np.full((-n % shards, h, w), -1, np.int32)])
    with jax.set_mesh(mesh):
      x = jax.device_put(grids, NamedSharding(mesh, P(axes)))
      uab, ud, counts = _sharded_pair_runs(x, tuple(offsets), vcap, mesh, axes)
  uab, ud, counts = np.asarray(uab), np.asarray(ud), np.asarray(counts)
  keep = uab != _PAD
  keys = uab[keep].astype(np.int64) * (h * (2 * w - 1)) + ud[keep]
  return keys, counts[keep].astype(np.int64)
