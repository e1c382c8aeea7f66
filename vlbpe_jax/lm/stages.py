"""Being-VL's progressive unfreezing as optax parameter partitions.

  stage 1: only the new rows train: `visual_embed` and `visual_head` (special + VQ + BPE rows;
           with a tied head the `visual_embed` rows are the head rows too), and
           `new_text_embed` / `new_text_head` (the image begin/end tokens, see below).
  stage 2: stage 1 + the first `ceil(first_frac * L)` decoder layers (the input side).
  stage 3: everything.

  tx = make_optimizer(2, params, optax.cosine_decay_schedule(3e-4, 1000), clip=1.0)
  opt = migrate_opt_state(opt_stage1, 1, 2, params, tx)   # also after a checkpoint restore

Every token that stage 1 must learn is in a new-rows table. `<img>` `</img>` have ids in the
text tokenizer's vocabulary, but a pretrained LLM (lm/hf.py) has never seen them, nor does our
text pretraining (stage 0 has no images), so their text rows are untrained. The model therefore
reads them from `new_text_embed` / `new_text_head` (`LMConfig.new_text_ids`, set by
`train.make_model`), small tables that override the text rows at those ids and sit in
`NEW_ROWS`. The text tables stay whole leaves, frozen bit for bit in stages 1-2 (the shadowed
rows get zero gradient), with no row mask in the optimizer and no Adam moments for them; the
ids need no remapping in the data. `hf.save_llama` folds the new rows into the exported tables
at their ids (and records the ids), so the HF model embeds `<img>` as trained here.

Frozen leaves get `optax.set_to_zero()`; clipping, Adam and weight decay live inside the
trainable branch of `optax.multi_transform`, so frozen gradients never enter the clip norm and
frozen weights never decay. Adam (`adam.scale_by_adam`) counts steps per leaf, so that at a
stage change the leaves trained before keep their moments *and* their count (their first update
is the one the old optimizer would have made) while newly trainable ones start fresh (count 0,
zero moments: exactly a fresh Adam step). So a stage change never inflates an update: new
leaves move by a fresh step, carried ones as if no stage had changed (within Adam's own bound,
~1.0x a fresh step for steady gradients). Resetting one shared count instead (as before) gave
carried moments up to 2.2x a fresh step at b2=0.95; carrying it would give fresh leaves up to
3.2x at b2=0.999 (see `adam`). The learning-rate schedule restarts with each stage.

Scanned layers (one `layers` stack with a leading L axis) cannot be split by a per-leaf label.
In stage 2 the whole stack is labelled trainable and the trainable branch multiplies by a layer
mask twice: on the gradients before clipping (frozen layers add nothing to the norm nor to the
Adam moments) and on the final updates (no weight decay for them), so frozen slices stay
bit-identical. Their moments stay zero and, like their per-slice counts, are reset to a fresh
state when stage 3 unfreezes them.
"""

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vlbpe_jax.lm import adam

TRAINABLE, FROZEN = "trainable", "frozen"
NEW_ROWS = ("visual_embed", "visual_head", "new_text_embed", "new_text_head")
STAGES = (1, 2, 3)


def num_first_layers(num_layers, first_frac=0.25):
  """ceil(first_frac * L), the layers stage 2 unfreezes (8 of 32 for Llama-3.1-8B)."""
  if not 0.0 <= first_frac <= 1.0:
    raise ValueError(f"first_frac={first_frac}: expected a fraction in [0, 1]")
  return math.ceil(round(first_frac * num_layers, 9))


def _top(path):
  return path[0].key


def _name(path):
  """The last dict key of a path (skips the index of a Partitioned box)."""
  return [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]


def _check_stage(stage):
  if stage not in STAGES:
    raise ValueError(f"stage={stage!r}: expected one of {STAGES}")


def param_labels(params, stage, num_layers, first_frac=0.25):
  """Pytree of "trainable"/"frozen" shaped like the unboxed `params` (boxed ones are unboxed)."""
  _check_stage(stage)
  params = nn.unbox(params)
  n_first = num_first_layers(num_layers, first_frac)

  def label(path, _):
    top = _top(path)
    if stage == 3 or top in NEW_ROWS:
      return TRAINABLE
    if stage == 2:
      m = re.fullmatch(r"layers_(\d+)", top)
      if top == "layers" or (m and int(m.group(1)) < n_first):
        return TRAINABLE
    return FROZEN

  return jax.tree_util.tree_map_with_path(label, params)


def layer_mask(stage, num_layers, first_frac=0.25):
  """Stateless transform zeroing the frozen layer slices of a scanned `layers` stack."""
  n_first = num_first_layers(num_layers, first_frac)

  def mask(updates, params=None):
    del params
    if stage != 2:
      return updates

    def one(path, u):
      if _top(path) != "layers":
        return u
      if u.shape[0] != num_layers:
        raise ValueError(f"scanned leaf {jax.tree_util.keystr(path)} has shape {u.shape}; "
                         f"expected a leading layer axis of num_layers={num_layers}")
      keep = (jnp.arange(num_layers) < n_first).reshape((-1,) + (1,) * (u.ndim - 1))
      return jnp.where(keep, u, jnp.zeros_like(u))

    return jax.tree_util.tree_map_with_path(one, updates)

  return optax.stateless(mask)


def default_decay_mask(params):
  """Weight decay on weight matrices and tables; none on norm scales and biases."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not (_name(path) == "scale" or _name(path).endswith("_bias")), params)


def num_layers_of(params):
  """L, read from the param tree (scanned stack or `layers_i` entries)."""
  params = nn.unbox(params)
  if "layers" in params:
    return jax.tree.leaves(params["layers"])[0].shape[0]
  return sum(1 for k in params if re.fullmatch(r"layers_\d+", k))


def make_optimizer(stage, params, schedule, clip=1.0, weight_decay=0.0, *, first_frac=0.25,
                   b1=0.9, b2=0.95, eps=1e-8, decay_mask=default_decay_mask):
  """AdamW on the stage's trainable leaves, zero updates elsewhere.

  schedule: a float or an optax schedule (learning rate per step of this stage).
  clip: global-norm clip over the trainable gradients only (None = no clipping).
  The transform's state tree has the same layout in every stage, as `migrate_opt_state` needs.
  `params` may be boxed (`nn.Partitioned`) or abstract: `tx.init(boxed_params)` then gives a
  boxed state whose logical names yield its shardings; update with unboxed trees.
  """
  _check_stage(stage)
  num_layers = num_layers_of(params)
  labels = param_labels(params, stage, num_layers, first_frac)
  mask = layer_mask(stage, num_layers, first_frac)
  trainable = optax.chain(
      mask,
      optax.identity() if clip is None else optax.clip_by_global_norm(clip),
      optax.chain(  # optax.adamw with per-leaf step counts
          adam.scale_by_adam(b1, b2, eps, stacked=lambda path: _top(path) == "layers"),
          optax.add_decayed_weights(weight_decay, decay_mask),
          optax.scale_by_learning_rate(schedule)),
      mask)
  return optax.multi_transform({TRAINABLE: trainable, FROZEN: optax.set_to_zero()}, labels)


def trainable_count(params, stage, first_frac=0.25):
  """Number of trainable parameters in a stage (scanned stacks counted per layer)."""
  params = nn.unbox(params)
  num_layers = num_layers_of(params)
  labels = param_labels(params, stage, num_layers, first_frac)
  n_first = num_first_layers(num_layers, first_frac)

  def count(path, x, label):
    if label == FROZEN:
      return 0
    if stage == 2 and _top(path) == "layers":
      return x.size // num_layers * n_first
    return x.size

  return sum(jax.tree.leaves(jax.tree_util.tree_map_with_path(count, params, labels)))


def _key(path):
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
    else:
      out.append(str(k))
  return tuple(out)


def migrate_opt_state(old_opt_state, old_stage, new_stage, params, new_tx, *,
                      first_frac=0.25):
  """Optimizer state for `new_tx` (the new stage's `make_optimizer`), carrying Adam over.

  Every array of the new state whose path also holds an array of the same shape in the old
  state is copied: the Adam moments *and per-leaf step counts* of leaves trainable before, so
  their first update in the new stage is exactly the one the old optimizer would have made.
  Leaves newly trainable keep their fresh state (count 0, zero moments): their first update is
  exactly a fresh Adam step. Layer slices of a scanned stack frozen in the old stage (stage 2,
  `first_frac` as in `make_optimizer`) are reset to the fresh state the same way. So no first
  update is inflated by the move (a restarted count gave carried moments up to 2.2x a fresh
  step at b2=0.95). The scalar counts (the learning-rate schedule's) restart at 0: each stage
  runs its own schedule. Works on a restored tree of plain arrays/dicts as well (paths are
  compared by their names)."""
  _check_stage(old_stage)
  _check_stage(new_stage)
  if new_stage < old_stage:
    raise ValueError(f"new_stage={new_stage} < old_stage={old_stage}: stages only unfreeze")
  old = {_key(p): x for p, x in jax.tree_util.tree_flatten_with_path(old_opt_state)[0]}
  fresh = new_tx.init(params)
  params = nn.unbox(params)
  num_layers = num_layers_of(params)
  stacked = {_key(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
             if _top(p) == "layers"}
  keep = jnp.arange(num_layers) < (num_first_layers(num_layers, first_frac)
                                   if old_stage == 2 else num_layers)

  def pick(path, x):
    key = _key(path)
    prev = old.get(key)
    if key[-1] == "count" or prev is None or getattr(prev, "shape", None) != x.shape:
      return x
    prev = jnp.asarray(prev, x.dtype)
    if any(key[i:] in stacked for i in range(len(key))):  # [L, ...]: frozen slices start fresh
      return jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), prev, x)
    return prev

  return jax.tree_util.tree_map_with_path(pick, fresh)
