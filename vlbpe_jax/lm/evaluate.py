"""Evaluation of the unified LM: VQA exact match, caption attribute precision/recall, dialogues.

  res = evaluate(model, params, tok, examples, visual["test"], batch_size=32)
  res["vqa_acc"], res["vqa_acc_heldout"], res["vqa_acc_heldout_se"], res["caption_recall"]
  res["vqa_acc_by_type"]                            # {"color": ..., "count": ..., ...}
  turns = dialogue(model, params, tok, examples[:3], visual["test"])

Answers are generated greedily with the KV cache (lm/generate.py) and stop at eos. VQA: one
prompt per question (`<img>...</img> <user> q <assistant>`), exact match of the decoded answer
with the short answer. Held-out (`heldout_question`): the questions whose answer depends on a
(color, shape) pair of `shapes.heldout_compositions()`, i.e. that name a held-out pair or ask
about an object that is one (its accuracy comes with a standard error; the other questions are
"seen", including the ones about another object of an image holding a held-out pair).
Captions: the continuation of `bos <img>...</img>` parsed by the scene checker and scored
against the scene's objects. `visual=None` evaluates a text-only model without the image (the
image-blind baseline).
"""

import jax
import numpy as np

from vlbpe_jax.data import shapes
from vlbpe_jax.eval import scene_checker
from vlbpe_jax.lm import generate
from vlbpe_jax.lm import sequences

WIDTH_BUCKET = 32  # prompts are left-padded to a multiple of this: few distinct compilations


def has_heldout(objects) -> bool:
  """Whether an image holds a held-out (color, shape) pair (most of its questions may not)."""
  heldout = set(shapes.heldout_compositions())
  return any((o["color"], o["shape"]) in heldout for o in objects)


_ATTRIBUTES = (("shape", shapes.SHAPES), ("color", tuple(shapes.COLORS)),
               ("size", shapes.SIZES), ("position", shapes.POSITIONS))


def _named(question: str) -> dict:
  """`{attribute: value}` of the attribute values a `shapes.questions` question names."""
  kind = shapes.question_type(question)  # raises on other templates
  named = {}
  for word in question.rstrip("?").split():
    for attr, values in _ATTRIBUTES:
      if word in values:
        named[attr] = word
  if not named and kind != "count":
    raise ValueError(f"question {question!r}: a {kind!r} question naming no shape, color, "
                     "size or position")
  return named


def question_objects(question: str, objects) -> list:
  """The objects whose attributes the answer to a `shapes.questions` question reads: those
  matching every value it names ("what color is the star at the top?": that star; "what
  shape is at the center?": the object there; "how many red objects are there?": the red ones;
  "is there a red star?": the red stars, none for a "no"). "how many objects are there?" reads
  none."""
  if shapes.question_type(question) == "count":
    return []
  named = _named(question)
  return [o for o in objects if all(o[a] == v for a, v in named.items())]


def heldout_question(question: str, objects) -> bool:
  """Whether the answer depends on a held-out composition: the question names a held-out
  (color, shape) pair ("where is the red star?", "is there a green triangle?" with a "no"
  answer too), or an object it reads (`question_objects`) is a held-out pair ("what color is
  the star?" about a red star; "how many red objects are there?" counting one). A question about
  another object of an image that holds a held-out pair is not, nor is the object count."""
  heldout = set(shapes.heldout_compositions())
  named = _named(question)
  if (named.get("color"), named.get("shape")) in heldout:
    return True
  return any((o["color"], o["shape"]) in heldout for o in question_objects(question, objects))


def heldout_scores(rows, examples) -> dict:
  """VQA accuracy on the held-out questions (`heldout_question`) with its standard error and
  count, and on the rest ("seen"), from `evaluate`'s `"answers"` rows `(example position,
  question, truth, generated)` over `examples` (NaN where a subset is empty)."""
  held, correct = [], []
  for k, q, truth, answer in rows:
    held.append(heldout_question(q, examples[k]["objects"]))
    correct.append(answer == truth)
  held, correct = np.array(held, bool), np.array(correct, bool)
  n = int(held.sum())
  acc = float(correct[held].mean()) if n else float("nan")
  return {"vqa_acc_heldout": acc,
          "vqa_acc_heldout_se": float(np.sqrt(acc * (1 - acc) / n)) if n else float("nan"),
          "vqa_acc_seen": float(correct[~held].mean()) if (~held).any() else float("nan"),
          "num_heldout_questions": n}


def generate_texts(model, params, tokenizer, prompts, *, batch_size: int, max_new_tokens: int,
                   positions=None):
  """Greedy continuations (decoded text) of token-id prompts, in fixed-shape batches.

  Every batch has `batch_size` rows (the last is filled with copies) and the common left-padded
  width of all prompts rounded up to WIDTH_BUCKET, so the generation compiles rarely. Generated
  ids outside the text vocabulary (visual or padding rows) decode to nothing. `positions`: one
  `[L, 2]` array of 2D RoPE positions per prompt (default: 1D positions).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}: expected >= 1")
  ids, mask = generate.left_pad(prompts, pad_id=tokenizer.pad_id)
  extra = -ids.shape[1] % WIDTH_BUCKET
  ids = np.pad(ids, ((0, 0), (extra, 0)), constant_values=tokenizer.pad_id)
  mask = np.pad(mask, ((0, 0), (extra, 0)))
  pos = None
  if positions is not None:
    if len(positions) != len(prompts):
      raise ValueError(f"{len(positions)} position arrays for {len(prompts)} prompts")
    pos = np.zeros(ids.shape + (2,), np.int32)
    for i, p in enumerate(positions):
      pos[i, ids.shape[1] - len(p):] = p
  texts = []
  for start in range(0, len(prompts), batch_size):
    rows = np.arange(start, start + batch_size).clip(max=len(prompts) - 1)
    out, lengths = generate.generate(
        model, params, ids[rows], mask[rows], jax.random.key(0),
        max_new_tokens=max_new_tokens, stop_tokens=(tokenizer.eos_id,),
        pad_id=tokenizer.pad_id, positions=None if pos is None else pos[rows])
    out, lengths = jax.device_get((out, lengths))
    n = min(batch_size, len(prompts) - start)
    texts += [tokenizer.decode([t for t in out[i, :lengths[i]] if t < tokenizer.vocab_size])
              .strip() for i in range(n)]
  return texts


def first_examples(source, num: int):
  """The decoded records of indices `0 .. num-1` of a source (tfds stores them hashed)."""
  from vlbpe_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
  records = sorted((tfds_builders.decode_record(source[i]) for i in range(len(source))),
                   key=lambda r: r["index"])
  return records[:num]


def accuracy_by_type(answers, *, valid: bool = False) -> dict:
  """`{question type: exact-match accuracy}` (shapes.QUESTION_TYPES order) of `evaluate`'s
  `"answers"` rows `(example, question, truth, generated)`; with `valid`, the fraction of
  answers that are any answer of the type (`shapes.ANSWERS`), i.e. in the right format."""
  hits = {}
  for _, q, truth, answer in answers:
    kind = shapes.question_type(q)
    hits.setdefault(kind, []).append(answer in shapes.ANSWERS[kind] if valid else
                                     answer == truth)
  return {name: float(np.mean(hits[name])) for name, _, _ in shapes.QUESTION_TYPES
          if name in hits}


def _visual_ids(visual, example):
  return None if visual is None else visual(example)


def _positions(tokenizer, prompts, examples, visual, grid):
  """2D positions of prompts (one example each) when `grid`, else None (1D)."""
  if not grid:
    return None
  return [sequences.prompt_positions(tokenizer, p, None if visual is None else visual.grid(ex))
          for p, ex in zip(prompts, examples)]


class OtherImage:
  """The wrong-image control: example k of `examples` is shown the image of example k + 1
  (cyclically). Accuracy above this control's comes from reading the right image, not from
  the question or the answer format."""

  def __init__(self, visual, examples):
    if len(examples) < 2:
      raise ValueError(f"{len(examples)} examples: the wrong-image control needs at least 2")
    self.visual = visual
    self.other = {int(ex["index"]): examples[(k + 1) % len(examples)]
                  for k, ex in enumerate(examples)}

  def __call__(self, example):
    return self.visual(self.other[int(example["index"])])

  def grid(self, example):
    return self.visual.grid(self.other[int(example["index"])])


def evaluate(model, params, tokenizer, examples, visual, *, batch_size: int = 32,
             max_answer_tokens: int = 8, max_caption_tokens: int = 64, captions: bool = True,
             grid: bool = False):
  """VQA accuracy (all / held-out with its SE / seen) and caption scores over `examples`.

  examples: dicts with `index`, `objects`, `qa` (decoded tfds records or shapes examples);
  visual: `sequences.VisualTokens` of their split (or `OtherImage`), or None (no image in the
  prompts). Returns floats and counts plus `"answers"` (per question: example position,
  question, truth, generated) and, with `captions`, caption scores and `"captions"`. `grid`:
  prompts get 2D RoPE positions from `visual.grid` (a model trained with `lm.positions="2d"`).
  """
  if not examples:
    raise ValueError("examples: expected at least one example")
  prompts, truth, where, owner = [], [], [], []
  for k, ex in enumerate(examples):
    vis = _visual_ids(visual, ex)
    for qa in ex["qa"]:
      prompts.append(sequences.vqa_prompt(tokenizer, vis, qa["q"]))
      truth.append(qa["a"])
      where.append((k, qa["q"]))
      owner.append(ex)
  answers = generate_texts(model, params, tokenizer, prompts, batch_size=batch_size,
                           max_new_tokens=max_answer_tokens,
                           positions=_positions(tokenizer, prompts, owner, visual, grid))
  correct = np.array([a == t for a, t in zip(answers, truth)])
  rows = [(k, q, t, a) for (k, q), t, a in zip(where, truth, answers)]
  out = {
      "vqa_acc": float(correct.mean()),
      **heldout_scores(rows, examples),
      "num_questions": int(len(correct)),
      "vqa_acc_by_type": accuracy_by_type(rows),
      "answers": rows,
  }
  if captions:
    prefixes = [sequences.image_prefix(tokenizer, _visual_ids(visual, ex)) for ex in examples]
    texts = generate_texts(
        model, params, tokenizer, prefixes, batch_size=batch_size,
        max_new_tokens=max_caption_tokens,
        positions=_positions(tokenizer, prefixes, examples, visual, grid))
    scores = [scene_checker.text_attribute_scores(c, ex["objects"])
              for c, ex in zip(texts, examples)]
    out.update(caption_precision=float(np.mean([s["precision"] for s in scores])),
               caption_recall=float(np.mean([s["recall"] for s in scores])), captions=texts)
  return out


def dialogue(model, params, tokenizer, examples, visual, *, batch_size: int = 8,
             max_new_tokens: int = 32, grid: bool = False):
  """Multi-turn chats: each example's human turns asked in order, the model's own answers kept
  in the context. Returns per example a list of `(question, reference, generated)`."""
  contexts = [sequences.image_prefix(tokenizer, _visual_ids(visual, ex)) for ex in examples]
  turns = [[(h["value"], g["value"]) for h, g in zip(ex["dialogue"][::2], ex["dialogue"][1::2])]
           for ex in examples]
  out = [[] for _ in examples]
  for t in range(max((len(x) for x in turns), default=0)):
    live = [i for i, x in enumerate(turns) if t < len(x)]
    prompts = [contexts[i] + sequences.turn(tokenizer, turns[i][t][0]) for i in live]
    answers = generate_texts(
        model, params, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
        positions=_positions(tokenizer, prompts, [examples[i] for i in live], visual, grid))
    for i, p, a in zip(live, prompts, answers):
      contexts[i] = p + tokenizer.encode(a) + [tokenizer.eos_id]
      out[i].append((turns[i][t][0], turns[i][t][1], a))
  return out
