"""Splash attention (the Pallas TPU flash kernel of `jax.experimental.pallas`) for the LM.

  y = splash_attention(q, k, v, segment_ids)  # q [B, T, N, K], k/v [B, T, Nkv, K]

Causal, restricted to equal `segment_ids` (packed rows), GQA as in
`jax.nn.dot_product_attention` (query head n reads kv head `n // (N / Nkv)`): the MQA kernel
runs once per kv head on that head's group of queries. Pallas kernels are not partitioned by
GSPMD, so under a mesh the call is a `shard_map` whose specs come from the logical axis rules
in force (`act_batch` over data/fsdp, `act_heads`/`act_kv_heads` over tensor; the sequence
stays whole). On TPU the kernel is compiled; on CPU it runs in Pallas interpret mode (slow,
for tests and debugging); other backends raise.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

from vlbpe_jax.lm import blockwise_attention

BLOCKS = (512, 256, 128)  # tried in order; the first that divides T is used


def _kernel(t: int, group: int, interpret: bool):
  """The MQA kernel for T tokens and `group` query heads per kv head (built per trace: it holds
  the mask's block tables as arrays, which must not outlive the trace)."""
  block = next((b for b in BLOCKS if t % b == 0), None)
  if block is None:
    raise ValueError(f"splash attention needs a sequence length divisible by {BLOCKS[-1]}; "
                     f"got T={t} (pad the rows, or use attention_impl='blockwise'/None)")
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)
  mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(group)])
  return sk.make_splash_mqa(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes,
                            interpret=interpret)


def _local(q, k, v, seg, interpret):
  """Per-device call on `[b, T, n, K]` / `[b, T, h, K]` / `[b, T]` shards."""
  kernel = _kernel(q.shape[1], q.shape[2] // k.shape[2], interpret)
  qh, kh, vh = blockwise_attention.heads_first(q, k, v)  # [b, h, G, T, K], [b, h, T, K]
  one = lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sk.SegmentIds(s1, s1))
  per_head = jax.vmap(one, in_axes=(0, 0, 0, None))
  o = jax.vmap(per_head)(qh, kh, vh, seg)  # [b, h, G, T, K]
  return blockwise_attention.heads_last(o, q.shape).astype(q.dtype)


def splash_attention(q, k, v, segment_ids=None):
  """Causal same-segment attention with the splash kernel. Returns `[B, T, N, K]`."""
  blockwise_attention.check_inputs(q, k, v, segment_ids)
  b, t = q.shape[:2]
  backend = jax.default_backend()
  if backend not in ("tpu", "cpu"):
    raise ValueError(f"attention_impl='splash' is a TPU kernel; this backend is {backend!r} "
                     "(use 'cudnn' on GPU)")
  seg = (jnp.ones((b, t), jnp.int32) if segment_ids is None
         else segment_ids.astype(jnp.int32))
  fn = functools.partial(_local, interpret=backend != "tpu")
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(q, k, v, seg)
  q_spec = nn.logical_to_mesh_axes(("act_batch", "act_len", "act_heads", "act_kv"))
  kv_spec = nn.logical_to_mesh_axes(("act_batch", "act_len", "act_kv_heads", "act_kv"))
  seg_spec = nn.logical_to_mesh_axes(("act_batch", "act_len"))
  return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
                       out_specs=q_spec, check_vma=False)(q, k, v, seg)
