"""Causal attention in query blocks that skips the masked upper triangle (custom VJP).

`jax.nn.dot_product_attention(..., implementation="xla")` computes the full T x T scores and
masks half of them, and its autodiff keeps the normalised probabilities in two layouts. On a
CPU that attention costs more than all the matmuls of a small model. Here each block of `block`
queries scores only the keys up to its own end (`(n+1)/2n` of the square for n blocks), the
softmax is normalised after the PV product, and the backward pass recomputes the probabilities
from the saved log-sum-exp (the FlashAttention identities `dS = P * (dP - rowsum(dO * O))`), so
nothing of size T x T outlives its block. Same convention as `jax.nn.dot_product_attention`:
GQA with query head `n` reading kv head `n // (N / Nkv)`, scale `1 / sqrt(K)`.

  y = blockwise_attention(q, k, v, segment_ids)  # q [B, T, N, K], k/v [B, T, Nkv, K]
"""

import functools

import chex
import jax
import jax.numpy as jnp

_F32 = dict(preferred_element_type=jnp.float32)


def _blocks(t, block):
  return [(lo, min(lo + block, t)) for lo in range(0, t, block)]


def _grouped(x, h):
  """`[B, T, N, K]` -> `[B, H, G, T, K]`: the G = N / H query heads of each of H kv heads."""
  b, t, n, d = x.shape
  return jnp.transpose(x.reshape(b, t, h, n // h, d), (0, 2, 3, 1, 4))


def heads_first(q, k, v):
  """q -> `[B, H, G, T, K]` scaled by `1 / sqrt(K)`; k, v -> `[B, H, T, K]` (the layout of the
  kernels here and in splash.py)."""
  qh = _grouped(q * q.shape[-1]**-0.5, k.shape[2])
  return qh, jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))


def heads_last(o, shape):
  """`[B, H, G, T, K]` -> `shape` (`[B, T, N, K]`): the inverse of `heads_first`'s q layout."""
  return jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(shape)


def same_context(seg_q, seg_k, br_q=None, br_k=None):
  """`[B, Tq, Tk]` bool: which keys a query may see besides causality: those of its segment
  (packed rows), and with branch ids (`[B, Tq]`, `[B, Tk]`) only those of branch 0 (the
  segment's shared prefix) or of its own branch."""
  same = seg_q[:, :, None] == seg_k[:, None, :]
  if br_q is not None:
    same &= (br_k[:, None, :] == 0) | (br_q[:, :, None] == br_k[:, None, :])
  return same


def _scores(qh, kh, seg, lo, hi):
  """Masked fp32 scores of queries `[lo, hi)` against keys `[0, hi)`: `[B, H, G, hi-lo, hi]`.
  `seg`: None, or (segment ids `[B, T]`, branch ids `[B, T]` or None) (`blockwise_attention`)."""
  s = jnp.einsum("BHGTK,BHSK->BHGTS", qh[..., lo:hi, :], kh[:, :, :hi], **_F32)
  allowed = jnp.arange(lo, hi)[:, None] >= jnp.arange(hi)[None, :]  # [t, hi]
  if seg is not None:
    ids, br = seg
    same = same_context(ids[:, lo:hi], ids[:, :hi], None if br is None else br[:, lo:hi],
                        None if br is None else br[:, :hi])
    allowed = allowed & same[:, None, None]
  return jnp.where(allowed, s, jnp.finfo(jnp.float32).min)


def _forward(q, k, v, seg, block):
  qh, kh, vh = heads_first(q, k, v)
  outs, lses = [], []
  for lo, hi in _blocks(q.shape[1], block):
    s = _scores(qh, kh, seg, lo, hi)
    m = jnp.max(s, axis=-1, keepdims=True)  # [B, H, G, t, 1]
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    outs.append(jnp.einsum("BHGTS,BHSK->BHGTK", p.astype(v.dtype), vh[:, :, :hi], **_F32) / l)
    lses.append(m + jnp.log(l))
  o = heads_last(jnp.concatenate(outs, axis=3), q.shape).astype(q.dtype)
  return o, lses


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, seg, block):
  return _forward(q, k, v, seg, block)[0]


def _attention_fwd(q, k, v, seg, block):
  o, lses = _forward(q, k, v, seg, block)
  return o, (q, k, v, seg, o, lses)


def _attention_bwd(block, res, do):
  q, k, v, seg, o, lses = res
  qh, kh, vh = heads_first(q, k, v)
  doh, oh = _grouped(do, k.shape[2]), _grouped(o, k.shape[2])  # [B, H, G, T, K]
  delta = jnp.sum(doh.astype(jnp.float32) * oh.astype(jnp.float32), -1, keepdims=True)
  dqs, dk, dv = [], jnp.zeros(kh.shape, jnp.float32), jnp.zeros(vh.shape, jnp.float32)
  for (lo, hi), lse in zip(_blocks(q.shape[1], block), lses):
    p = jnp.exp(_scores(qh, kh, seg, lo, hi) - lse)  # [B, H, G, t, hi]
    dp = jnp.einsum("BHGTK,BHSK->BHGTS", doh[..., lo:hi, :], vh[:, :, :hi], **_F32)
    ds = (p * (dp - delta[..., lo:hi, :])).astype(q.dtype)
    dqs.append(jnp.einsum("BHGTS,BHSK->BHGTK", ds, kh[:, :, :hi], **_F32))
    dk = dk.at[:, :, :hi].add(jnp.einsum("BHGTS,BHGTK->BHSK", ds, qh[..., lo:hi, :], **_F32))
    dv = dv.at[:, :, :hi].add(jnp.einsum("BHGTS,BHGTK->BHSK", p.astype(do.dtype),
                                         doh[..., lo:hi, :], **_F32))
  dq = heads_last(jnp.concatenate(dqs, axis=3) * q.shape[-1]**-0.5, q.shape)
  back = lambda x, like: jnp.transpose(x, (0, 2, 1, 3)).astype(like.dtype)
  return dq.astype(q.dtype), back(dk, k), back(dv, v), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def check_inputs(q, k, v, segment_ids=None, branch_ids=None):
  """Raises unless q `[B, T, N, K]`, k/v `[B, T, Nkv, K]` (N % Nkv == 0), segments and
  branches `[B, T]` (branches only with segments)."""
  chex.assert_rank([q, k, v], 4)
  chex.assert_equal_shape([k, v])
  b, t, n, d = q.shape
  if k.shape[:2] != (b, t) or k.shape[3] != d or n % k.shape[2]:
    raise ValueError(f"q {q.shape} and k/v {k.shape}: expected [B, T, N, K] and [B, T, Nkv, K] "
                     "with N a multiple of Nkv (self-attention, no cache)")
  if segment_ids is not None:
    chex.assert_shape(segment_ids, (b, t))
  if branch_ids is not None:
    if segment_ids is None:
      raise ValueError("branch_ids without segment_ids: expected both (branches live in a "
                       "packed row's segments)")
    chex.assert_shape(branch_ids, (b, t))


def blockwise_attention(q, k, v, segment_ids=None, block=64, branch_ids=None):
  """Causal (and, with `segment_ids [B, T]`, same-segment) attention.

  q: `[B, T, N, K]`; k, v: `[B, T, Nkv, K]` with `N % Nkv == 0`. Returns `[B, T, N, K]` in
  q's dtype; scores, softmax and accumulation run in float32. `branch_ids [B, T]` (with
  segments): a query of branch k > 0 sees only keys of branch 0 (its segment's shared prefix)
  and of branch k.
  """
  check_inputs(q, k, v, segment_ids, branch_ids)
  if block < 1:
    raise ValueError(f"block={block}: expected a positive number of queries per block")
  seg = None if segment_ids is None else (segment_ids, branch_ids)
  return _attention(q, k, v, seg, block)
