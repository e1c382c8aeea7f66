"""Probe: cost per merge of a dense jitted encoder (why `VisualBPE.encode` is vectorised numpy).

  .venv/bin/python benchmarks/bpe_dense_encode_probe.py --n 1000 --merges 256

A jitted encoder must touch every cell of the batch for every merge (`lax.scan` over merges,
fixed shapes), while the numpy encoder only visits the anchors of token a. This times the
cheapest dense step (a != b, no chains, footprint of b padded to 16 cells) on [N, 32, 32] and
prints the time per merge and the implied images/s for 8192 merges (a lower bound on cost).
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def dense_encode(tok, merges, fp, h, w):
  """tok: [N, H*W] int32; merges: [M, 5] (a, b, dy, dx, t); fp: [M, F, 2] padded (-99)."""
  cells = jnp.arange(h * w)
  y, x = cells // w, cells % w

  def step(state, m):
    tok, own = state
    (a, b, dy, dx, t), f = m[0], m[1]
    ok = (y + dy < h) & (x + dx >= 0) & (x + dx < w)
    q = jnp.where(ok, cells + dy * w + dx, 0)                      # [HW]
    hit = (tok == a) & ok & (jnp.take(tok, q, axis=1) == b)        # [N, HW]
    tok = jnp.where(hit, t, tok)
    rows = jnp.arange(tok.shape[0])[:, None]
    tok = tok.at[rows, jnp.where(hit, q, h * w)].set(-1, mode="drop")
    fcell = q[:, None] + f[None, :, 0] * w + f[None, :, 1]          # [HW, F]
    tgt = jnp.where(hit[:, :, None] & (f[None, None, :, 0] > -99), fcell[None], h * w)
    own = own.at[rows[:, :, None], tgt].set(cells[None, :, None], mode="drop")
    return (tok, own), None

  own = jnp.broadcast_to(jnp.arange(h * w, dtype=jnp.int32), tok.shape)
  (tok, own), _ = jax.lax.scan(step, (tok, own), (merges, fp))
  return tok, own


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--n", type=int, default=1000)
  ap.add_argument("--merges", type=int, default=256)
  args = ap.parse_args()
  rng = np.random.default_rng(0)
  tok = jnp.asarray(rng.integers(0, 8192, (args.n, 1024)), jnp.int32)
  merges = np.stack([rng.integers(0, 8192, args.merges), rng.integers(0, 8192, args.merges),
                     np.zeros(args.merges, int), np.ones(args.merges, int),
                     8192 + np.arange(args.merges)], 1).astype(np.int32)
  fp = np.full((args.merges, 16, 2), -99, np.int32)
  fp[:, 0] = 0
  fn = jax.jit(dense_encode, static_argnames=("h", "w"))
  jax.block_until_ready(fn(tok, merges, fp, h=32, w=32))  # compile
  t = time.perf_counter()
  jax.block_until_ready(fn(tok, merges, fp, h=32, w=32))
  per_merge = (time.perf_counter() - t) / args.merges
  print(json.dumps({"probe": "dense_jitted_encode_step", "n": args.n,
                    "ms_per_merge": round(per_merge * 1e3, 3),
                    "implied_images_per_s_8192_merges": round(args.n / (per_merge * 8192), 1),
                    "device": str(jax.devices()[0])}))


if __name__ == "__main__":
  main()
