"""Few-shot captioning and VQA by the frozen LM reading V2L global tokens (and their controls).

  tasks = caption_tasks(num_train, num_test, shot=2, num=50, seed=0)
  rows = run_captions(lm, tasks, ids_of, train_captions, num_test=n,
                      max_new_tokens=48)                  # {"query", "text"}
  scores = caption_scores(rows, test_objects)        # attribute precision / recall (parser)
  tasks = vqa_tasks(train_qa, test_qa, shot=3, num=50, seed=0)
  rows = run_vqa(lm, tasks, ids_of, num_test=n)      # {"question", "answer", "pred"}

Captioning (the paper's "Input: Tg, output: caption"): `shot` train images with their first
caption, then the query test image; the LM's greedy continuation up to the next example header
(or eos) is the caption, scored with the scene checker's caption parser
(`eval/scene_checker.text_attribute_scores`: precision and recall of the (object, attribute)
facts it states). VQA (the paper's "Condition: Tg. Question: Q. Answer: A"): one question of the
query image drawn per task, `shot` train images each with a question of the same template
(`question_type`: its shape/colour/size/position words replaced by their role) and its answer;
exact match of the greedy answer. The wrong-image control gives each prompt another test image's
tokens for the query (`wrong_image`): what the LM gets from the prompt's text alone.
"""

import re

import jax
import numpy as np

from vlbpe_jax.data import shapes
from vlbpe_jax.eval import scene_checker
from vlbpe_jax.lm import generate as lm_generate
from vlbpe_jax.v2l import prompts

_ROLES = {**{w: "{shape}" for w in shapes.SHAPES}, **{w: "{color}" for w in shapes.COLORS},
          **{w: "{size}" for w in shapes.SIZES}, **{w: "{position}" for w in shapes.POSITIONS}}
_WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")
PAD_MULTIPLE = 64  # prompts are left-padded to a multiple of this (one compilation per width)


def question_type(question: str) -> str:
  """"what color is the star at the left?" -> "what color is the {shape} at the {position}?"."""
  return _WORD.sub(lambda m: _ROLES.get(m.group(0), m.group(0)), question.lower())


def wrong_image(index: int, num: int) -> int:
  """The control's query image: the next test image (never the query itself when num > 1)."""
  return (index + 1) % num


def caption_tasks(num_train: int, num_test: int, *, shot: int, num: int, seed: int):
  """`num` tasks {"support": [train index], "query": test index} (queries without repeats
  while they last)."""
  if shot < 1 or num < 1 or num_train < shot or num_test < 1:
    raise ValueError(f"shot={shot}, num={num}, num_train={num_train}, num_test={num_test}: "
                     "expected shot >= 1, num >= 1, num_train >= shot, num_test >= 1")
  rng = np.random.default_rng([seed, shot, 7])
  queries = np.resize(rng.permutation(num_test), num)
  return [{"support": [int(i) for i in rng.choice(num_train, shot, replace=False)],
           "query": int(q)} for q in queries]


def vqa_tasks(train_qa, test_qa, *, shot: int, num: int, seed: int):
  """`num` tasks {"support": [(train index, q, a)], "query": test index, "question", "answer"}.

  train_qa / test_qa: per image, a list of {"q", "a"}. A query question whose template has
  fewer than `shot` train images is redrawn; [] when no question has enough.
  """
  if shot < 1 or num < 1:
    raise ValueError(f"shot={shot}, num={num}: expected shot >= 1, num >= 1")
  by_type = {}
  for i, qas in enumerate(train_qa):
    for qa in qas:
      by_type.setdefault(question_type(qa["q"]), []).append((i, qa["q"], qa["a"]))
  usable = [(i, qa) for i, qas in enumerate(test_qa) for qa in qas
            if len({j for j, _, _ in by_type.get(question_type(qa["q"]), ())}) >= shot]
  if not usable:
    return []
  rng = np.random.default_rng([seed, shot, 11])
  tasks = []
  for k in rng.permutation(len(usable))[:num]:
    i, qa = usable[int(k)]
    pool = by_type[question_type(qa["q"])]
    support, seen = [], set()
    for j in rng.permutation(len(pool)):  # one example per train image
      if pool[j][0] not in seen:
        seen.add(pool[j][0])
        support.append(pool[j])
      if len(support) == shot:
        break
    tasks.append({"support": support, "query": i, "question": qa["q"], "answer": qa["a"]})
  return tasks


def stop_ids(tok) -> tuple:
  """What ends a generated answer: the first id of either example header, and eos."""
  return tuple(sorted({prompts.end_id(tok), tok.encode("\n###\nCondition:")[0], tok.eos_id}))


def greedy_texts(lm, prompt_ids, *, max_new_tokens: int, batch_size: int = 16) -> list[str]:
  """Greedy continuations of id prompts by the frozen LM (KV cache), cut at a stop id; one
  compilation per padded width (`PAD_MULTIPLE`) and batch size."""
  if batch_size < 1 or max_new_tokens < 1:
    raise ValueError(f"batch_size={batch_size}, max_new_tokens={max_new_tokens}: expected >= 1")
  stops = stop_ids(lm.tok)
  batch_size = min(batch_size, len(prompt_ids))
  out = []
  for start in range(0, len(prompt_ids), batch_size):
    chunk = list(prompt_ids[start:start + batch_size])
    n = len(chunk)
    chunk += [chunk[-1]] * (batch_size - n)  # a fixed batch: one compilation
    ids, mask = lm_generate.left_pad(chunk, multiple=PAD_MULTIPLE)
    toks, lengths = jax.device_get(lm_generate.generate(
        lm.model, lm.params, ids, mask, jax.random.key(0), max_new_tokens=max_new_tokens,
        stop_tokens=stops))
    for row, length in zip(toks[:n], lengths[:n]):
      row = [int(t) for t in row[:length] if int(t) not in stops]
      out.append(lm.tok.decode(row).strip())
  return out


def run_captions(lm, tasks, image_ids, train_captions, *, num_test: int, max_new_tokens: int,
                 batch_size: int = 16, control: bool = False) -> list[dict]:
  """Rows {"query", "text"}; image_ids(index, split) -> LM id lists. `control`: the query
  reads `wrong_image`'s tokens (the row keeps the true query index)."""
  ids = []
  for t in tasks:
    q = wrong_image(t["query"], num_test) if control else t["query"]
    support = [(image_ids(i, "train"), train_captions[i][0]) for i in t["support"]]
    ids.append(prompts.caption_prompt(lm.tok, support, image_ids(q, "test")))
  texts = greedy_texts(lm, ids, max_new_tokens=max_new_tokens, batch_size=batch_size)
  return [{"query": t["query"], "text": x} for t, x in zip(tasks, texts)]


def caption_scores(rows, test_objects) -> dict:
  """Mean attribute precision / recall of the rows' captions against their query scenes."""
  if not rows:
    return {"precision": float("nan"), "recall": float("nan")}
  s = [scene_checker.text_attribute_scores(r["text"], test_objects[r["query"]]) for r in rows]
  return {k: float(np.mean([x[k] for x in s])) for k in ("precision", "recall")}


def run_vqa(lm, tasks, image_ids, *, num_test: int, max_new_tokens: int = 4,
            batch_size: int = 16, control: bool = False) -> list[dict]:
  """Rows {"query", "question", "answer", "pred"} (greedy answer, stripped)."""
  ids = []
  for t in tasks:
    q = wrong_image(t["query"], num_test) if control else t["query"]
    support = [(image_ids(i, "train"), qq, a) for i, qq, a in t["support"]]
    ids.append(prompts.vqa_prompt(lm.tok, support, image_ids(q, "test"), t["question"]))
  preds = greedy_texts(lm, ids, max_new_tokens=max_new_tokens, batch_size=batch_size)
  return [{"query": t["query"], "question": t["question"], "answer": t["answer"], "pred": p}
          for t, p in zip(tasks, preds)]


def vqa_accuracy(rows) -> float:
  """Exact match (after stripping a trailing '.'); NaN when there are no rows."""
  if not rows:
    return float("nan")
  return float(np.mean([r["pred"].rstrip(".").strip() == r["answer"] for r in rows]))
