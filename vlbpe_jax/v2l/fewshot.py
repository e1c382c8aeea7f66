"""N-way K-shot classification by the frozen LM reading V2L global tokens (and its text control).

  python -m vlbpe_jax.v2l.fewshot --config=configs/tiny.py --workdir=$W \
      --config.v2l.fewshot_episodes=200   # any train.EVAL_FIELDS value: the same trained V2L

  tasks = image_tasks(train_labels, test_labels, way=2, shot=1, num=50, seed=0)
  rows = run_tasks(lm, tasks, lambda i, split: ids_of[split][i])   # one row per episode
  acc = accuracy(rows)                                             # recomputed from the rows

An episode (`image_tasks`): `way` classes drawn among those with >= `shot` support images and
>= 1 query image, one query image (from the test split) of a class drawn uniformly, `shot`
support images per class (from the train split), in random order. Only single-object scenes
take part (a scene's label is its one shape). Prompt: `prompts.classification_prompt` with each
image's global tokens as LM ids (each entry its 1-3 subword ids, never re-tokenised text), then
greedy decoding constrained to the class names (`constrained.classify`, `end_id` after each
label); a hit is the exact class. Chance: 1 / way. The text-only control (`text_rows`) runs
`data/icl.text_fewshot_tasks` through the same prompt and decoder. The token-overlap control
(`overlap_rows`, no LM) answers each episode with the class whose support images share the most
global tokens with the query: what plain matching of the tokens tells apart, no LM involved
(as the majority vote is for restoration; a learner that weighs the tokens could do better).
"""

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from vlbpe_jax import cli
from vlbpe_jax import fileio
from vlbpe_jax.data import icl
from vlbpe_jax.v2l import constrained
from vlbpe_jax.v2l import prompts


def single_object_labels(objects, attribute: str = "shape") -> np.ndarray:
  """Object lists -> the label of each single-object scene, None elsewhere (object array)."""
  return np.asarray([o[0][attribute] if len(o) == 1 else None for o in objects], object)


def image_tasks(train_labels, test_labels, *, way: int, shot: int, num: int, seed: int):
  """`num` episodes: {"support": [(train index, label)], "query": test index, "answer",
  "classes"}; [] when fewer than `way` classes have enough images."""
  if way < 2 or shot < 1 or num < 1:
    raise ValueError(f"way={way}, shot={shot}, num={num}: expected way >= 2, shot >= 1, num >= 1")
  by_train, by_test = {}, {}
  for i, y in enumerate(train_labels):
    if y is not None:
      by_train.setdefault(y, []).append(i)
  for i, y in enumerate(test_labels):
    if y is not None:
      by_test.setdefault(y, []).append(i)
  usable = sorted(y for y in by_test if len(by_train.get(y, ())) >= shot)
  if len(usable) < way:
    return []
  rng = np.random.default_rng([seed, way, shot])
  tasks = []
  for _ in range(num):
    classes = [usable[j] for j in rng.permutation(len(usable))[:way]]
    answer = classes[int(rng.integers(way))]
    query = int(rng.choice(by_test[answer]))
    support = [(int(i), c) for c in classes for i in rng.choice(by_train[c], shot, replace=False)]
    support = [support[j] for j in rng.permutation(len(support))]
    tasks.append({"support": support, "query": query, "answer": answer, "classes": classes})
  return tasks


def run_tasks(lm, tasks, image_ids=None, *, batch_size: int = 16) -> list[dict]:
  """Classifies every task with the frozen LM; returns rows {"classes", "answer", "pred"}.

  image_ids(index, split) -> an image's global tokens as LM id lists (`split` "train" for
  support, "test" for the query); None: the tasks' inputs are text (the text-only control).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}: expected >= 1")
  tok = lm.tok
  end = prompts.end_id(tok)
  rows = []
  for start in range(0, len(tasks), batch_size):
    chunk = tasks[start:start + batch_size]
    ids = []
    for t in chunk:
      if image_ids is None:
        support, query = t["support"], t["query"]
      else:
        support = [(image_ids(i, "train"), y) for i, y in t["support"]]
        query = image_ids(t["query"], "test")
      ids.append(prompts.classification_prompt(tok, support, query, t["classes"]))
    labels = [prompts.label_ids(tok, t["classes"]) for t in chunk]
    preds = constrained.classify(lm.model, lm.params, ids, labels, end_id=end)
    rows += [{"classes": list(t["classes"]), "answer": t["answer"], "pred": p,
              "prompt_len": len(i)} for t, p, i in zip(chunk, preds, ids)]
  return rows


def overlap_rows(tasks, image_ids, *, seed: int) -> list[dict]:
  """The token-overlap control: rows {"classes", "answer", "pred", "tied"} as `run_tasks`.

  Each class scores the number of global tokens (items of `image_ids(i, split)`, each an entry's
  id list) that its support images share with the query's, summed over its shots; the
  prediction is the best-scoring class, ties broken uniformly at random (`seed` and the
  episode's index); "tied" is the number of classes that shared the best score.
  """
  rows = []
  for n, t in enumerate(tasks):
    query = {tuple(e) for e in image_ids(t["query"], "test")}
    score = dict.fromkeys(t["classes"], 0)
    for i, y in t["support"]:
      if y not in score:
        raise ValueError(f"support label {y!r} is not one of the classes {t['classes']}")
      score[y] += len(query & {tuple(e) for e in image_ids(i, "train")})
    best = max(score.values())
    tied = [c for c in t["classes"] if score[c] == best]
    pred = tied[int(np.random.default_rng([seed, n]).integers(len(tied)))]
    rows.append({"classes": list(t["classes"]), "answer": t["answer"], "pred": pred,
                 "tied": len(tied)})
  return rows


def text_rows(lm, *, way: int, shot: int, num: int, seed: int, batch_size: int = 16,
              label_set: str = "shape"):
  """The text-only control: the same prompt and decoder on `icl.text_fewshot_tasks`."""
  tasks = icl.text_fewshot_tasks(seed, num, way=way, shot=shot, label_set=label_set)
  return run_tasks(lm, tasks, None, batch_size=batch_size)


def accuracy(rows) -> float:
  """Exact-match accuracy of stored rows; NaN when there are none."""
  if not rows:
    return float("nan")
  return float(np.mean([r["pred"] == r["answer"] for r in rows]))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  jax.config.update("jax_threefry_partitionable", True)
  from vlbpe_jax.v2l import stage  # pylint: disable=g-import-not-at-top
  from vlbpe_jax.v2l import train  # pylint: disable=g-import-not-at-top
  ctx = train.load_context(flags.FLAGS.config, flags.FLAGS.workdir)
  params = train.restore_state(ctx.s)["params"]
  results = stage.run_fewshot(ctx, params)
  print(fileio.dumps_json(stage.fewshot_metrics(results, ctx.test["objects"])))


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config file (configs/tiny.py).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Pipeline directory (data, text or text_icl, "
                      "clip and a trained V2L: python -m vlbpe_jax.v2l.train).")
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main)
