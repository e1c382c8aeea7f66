"""Text-only in-context episodes: stage-0 pretraining data and the text-only few-shot control.

  texts = episodes(np.random.default_rng(0), 1000)               # list[str]
  ids, loss_mask = episode_ids(tok, sample_episode(rng))        # one training sequence
  tasks = text_fewshot_tasks(0, 200, way=2, shot=1)            # the text-only accuracy set

Kinds (so that a small LM learns to use examples, as V2L's frozen LM must):
- "classify": N-way K-shot with a random symbol -> label mapping per episode, in EXACTLY the
  layout of `v2l.prompts.classification_parts` (the visual prompt), with inputs that are
  strings of symbols instead of image ids. Each class has a prototype of `input_len` symbols;
  an example is its prototype with each symbol replaced by a random one with prob `noise`
  (like the overlapping global tokens of two images of one class). Labels: shape names or
  colour names (data/shapes.py), drawn per episode.
- "copy": the same layout, each output is its input (copy from context).
- "induction": a random symbol sequence, then the sequence again (induction heads).
And, as its own stage-0 task ("denoise", `denoise_ids`, not one of `KINDS`: it needs the
tokenizer): in-context denoising in EXACTLY the layout of `v2l.prompts.restoration_parts` (the
restoration prompt), on random ids of the LM's local vocabulary (`v2l.codebook.subword_texts`,
the ids V2L's local tokens are): a clean pair (x, y) (in training, drawn from all of them or
from a few, as an image map's windows repeat a few tokens), 10 examples that are x and y with each
position replaced by a random id at the protocol's rates (`v2l.corrupt.rates`, 0.50...0.23),
and a query x with a random share (0-50%) of its positions replaced; the target is the clean
y. A pretrained LLM brings this (copy the consensus of noisy examples) from its pretraining;
the demo's stand-in learns it from these text-only episodes, with no image involved.
An `Episode` is text parts joined by spaces (`prompts.prompt_text`); `targets` marks the parts
trained on (labels, copied outputs, the repeat). Encoding the parts one by one equals
encoding the text (sentencepiece splits at spaces), so the ids match the visual prompts'.

To add "icl" as a stage-0 task (lead): in `data/pipeline.py:format_example`, for
`task == "icl"` return `icl.episode_ids(tokenizer, icl.sample_episode(rng))` (the record is
ignored; `rng` is grain's per-example generator), add "icl" to `TASKS`, and put
`icl.episodes(...)` texts in the text tokenizer's training texts so "Input:"/"Output:" and the
symbols become pieces.
"""

import dataclasses
import functools

import numpy as np

from vlbpe_jax.data import shapes
from vlbpe_jax.v2l import codebook
from vlbpe_jax.v2l import corrupt
from vlbpe_jax.v2l import prompts

LABEL_SETS = {"shape": tuple(shapes.SHAPES), "color": tuple(shapes.COLORS)}
# Letters and scene words that are never labels.
SYMBOLS = tuple("abcdefghijklmnopqrstuvwxyz") + (
    "small", "large", "top", "bottom", "left", "right", "center", "black", "gray", "white")
KINDS = ("classify", "copy", "induction")
SPAN_SYMBOLS = SYMBOLS + sum(LABEL_SETS.values(), ())  # span_induction_episode's words


@dataclasses.dataclass(frozen=True)
class Episode:
  parts: tuple[str, ...]  # text parts, joined by single spaces
  targets: tuple[bool, ...]  # per part: in the loss

  @property
  def text(self) -> str:
    return prompts.prompt_text(self.parts)


def _word(rng, symbols, n):
  return [symbols[i] for i in rng.integers(len(symbols), size=n)]


def classification_task(rng, *, way=2, shot=1, label_set="shape", input_len=4, noise=0.25,
                        symbols=SYMBOLS, shuffle=False) -> dict:
  """One N-way K-shot task: {"support": [(str, label)], "query", "answer", "classes"}.

  shuffle=True: each instance's symbols in a random order (prototypes distinct as sets), as an
  image's global tokens are the same few entries in an order that varies between images of one
  class (BENCHMARKS.md, "Few-shot classification"): only a match of the symbols as a set
  classifies, not one of a symbol and its neighbour."""
  if label_set not in LABEL_SETS:
    raise ValueError(f"label_set={label_set!r}: expected one of {sorted(LABEL_SETS)}")
  names = LABEL_SETS[label_set]
  if not 2 <= way <= len(names) or shot < 1 or input_len < 1 or not 0 <= noise < 1:
    raise ValueError(f"way={way}, shot={shot}, input_len={input_len}, noise={noise}: expected "
                     f"2 <= way <= {len(names)}, shot >= 1, input_len >= 1, 0 <= noise < 1")
  if len(symbols) ** input_len < 2 * way:
    raise ValueError(f"{len(symbols)} symbols, input_len={input_len}: too few inputs for "
                     f"way={way}")
  classes = [names[i] for i in rng.permutation(len(names))[:way]]
  protos = []
  while len(protos) < way:
    p = _word(rng, symbols, input_len)
    if (sorted(p) not in [sorted(q) for q in protos]) if shuffle else (p not in protos):
      protos.append(p)

  def instance(c):
    w = list(protos[c])
    for j in np.flatnonzero(rng.random(input_len) < noise):
      w[j] = symbols[rng.integers(len(symbols))]
    if shuffle:
      w = [w[j] for j in rng.permutation(input_len)]
    return " ".join(w)

  support = [(instance(c), classes[c]) for c in range(way) for _ in range(shot)]
  support = [support[i] for i in rng.permutation(len(support))]
  c = int(rng.integers(way))
  return {"support": support, "query": instance(c), "answer": classes[c], "classes": classes}


def _episode(parts, decided_only=False):
  """Targets: every part after an "Output:" (with `decided_only`, only the labels seen before in
  the episode: those its earlier examples decide)."""
  outputs = [i for i in range(1, len(parts)) if parts[i - 1] == prompts.EXAMPLE_OUT]
  if decided_only:
    outputs = [i for i in outputs if parts[i] in [parts[j] for j in outputs if j < i]]
  return Episode(tuple(parts), tuple(i in outputs for i in range(len(parts))))


def classification_episode(rng, *, decided_only=False, **task_kw) -> Episode:
  """A `classification_task` with its answer; the loss on every label, or with `decided_only`
  on those an earlier example of the class decides (the query's always: each class is in the
  support). A 1-shot support label names a class not seen before, so training on it teaches
  naming a new class, not reading the examples (BENCHMARKS.md, "Few-shot classification")."""
  t = classification_task(rng, **task_kw)
  return _episode(prompts.classification_parts(t["support"], t["query"], t["classes"],
                                               answer=t["answer"]), decided_only)


def copy_episode(rng, *, shots=3, max_len=4, symbols=SYMBOLS) -> Episode:
  """`shots` examples plus the query, each "Input: < x >\\nOutput: x"."""
  xs = [" ".join(_word(rng, symbols, int(rng.integers(1, max_len + 1))))
        for _ in range(shots + 1)]
  parts = []
  for x in xs:
    parts += [prompts.EXAMPLE_IN, "<", x, prompts.EXAMPLE_OUT, x]
  return _episode(parts)


def induction_episode(rng, *, min_len=3, max_len=10, symbols=SYMBOLS,
                      span=False, to_end=False) -> Episode:
  """A random symbol sequence, then the same again (the repeat is the target).

  span=True: the repeat is a span of at least 2 symbols from anywhere in the sequence, after 0-3
  random filler symbols. A whole repeat right after the sequence can be copied by position (the
  token after the row's start, then the next...); a span at a random offset can only be
  copied by finding the earlier occurrence of the current symbol and reading what followed it,
  the match an in-context classifier needs. to_end=True (with span): the span runs from its
  random start to the sequence's end, so that every symbol of it after the first is a match
  to copy (on average twice as many as a span that ends anywhere), and so is the eos."""
  if span and min_len < 2:
    raise ValueError(f"min_len={min_len}: span=True needs sequences of >= 2 symbols")
  if to_end and not span:
    raise ValueError("to_end=True: expected span=True (a whole repeat already runs to the end)")
  n = int(rng.integers(min_len, max_len + 1))
  words = _word(rng, symbols, n)
  if not span:
    seq = " ".join(words)
    return Episode((seq, seq), (False, True))
  start = int(rng.integers(n - 1))
  stop = n if to_end else int(rng.integers(start + 2, n + 1))
  filler = _word(rng, symbols, int(rng.integers(4)))
  return Episode((" ".join(words + filler), " ".join(words[start:stop])), (False, True))


def span_induction_episode(rng) -> Episode:
  """`induction_episode(span=True)` over `SPAN_SYMBOLS`, the symbols and every label word (the
  pipeline's "span_induction" task): the content match "g blue k red k" -> "red" of an
  in-context classifier, which whole repeats never teach (BENCHMARKS.md, "Few-shot
  classification")."""
  return induction_episode(rng, symbols=SPAN_SYMBOLS, span=True)


def suffix_induction_episode(rng) -> Episode:
  """`induction_episode(span=True, to_end=True)` over `SPAN_SYMBOLS` (the pipeline's
  "suffix_induction" task): the same match with more of each episode to copy by it, which
  forms it in fewer steps (BENCHMARKS.md, "Few-shot classification")."""
  return induction_episode(rng, symbols=SPAN_SYMBOLS, span=True, to_end=True)


def denoise_task(rng, vocab_ids, *, m: int = 2, ns=(2, 16), max_query_noise=0.5,
                 shots=(corrupt.NUM_COPIES,), palettes=(0,)) -> dict:
  """One in-context denoising task over `vocab_ids` (module docstring): {"examples": [(x_i,
  y_i)], "query": x_q, "answer": y} as int lists. n drawn from `ns` (the restoration protocol's
  n = 2 for deblur / shift / rotation, 16 for the painting tasks), m output ids, the number of
  examples from `shots` (their rates a sorted draw of `corrupt.rates()`; 10: all of them, as
  the protocol). With n == m the input and output windows are the same map positions, so an
  example's replaced positions and ids are the same in x_i and y_i (`corrupt.py`'s `paired`);
  otherwise they are drawn apart. The query: x with each position replaced with a probability
  drawn in [0, max_query_noise]. `palettes`: per task one size k is drawn; k > 0 draws the
  clean x and y from k ids of the vocabulary (windows of an image map repeat a few tokens: its
  background's), 0 from all of them; the noise ids always come from the whole vocabulary."""
  vocab_ids = np.asarray(vocab_ids).reshape(-1)
  if vocab_ids.size < 2 or m < 1 or not ns or min(ns) < 1 or not 0 <= max_query_noise <= 1:
    raise ValueError(f"{vocab_ids.size} vocab ids, m={m}, ns={ns!r}, max_query_noise="
                     f"{max_query_noise}: expected >= 2 ids, m >= 1, ns of ints >= 1, a noise "
                     "in [0, 1]")
  if not shots or not all(1 <= int(k) <= corrupt.NUM_COPIES for k in shots):
    raise ValueError(f"shots={shots!r}: expected counts in [1, {corrupt.NUM_COPIES}]")
  if not palettes or not all(0 <= int(k) <= vocab_ids.size for k in palettes):
    raise ValueError(f"palettes={palettes!r}: expected sizes in [0, {vocab_ids.size}]")
  n = int(ns[int(rng.integers(len(ns)))])
  k = int(palettes[int(rng.integers(len(palettes)))] if len(palettes) > 1 else palettes[0])
  clean = rng.choice(vocab_ids, k, replace=False) if k else vocab_ids
  x, y = rng.choice(clean, n), rng.choice(clean, m)

  def noisy(seq, p, repl=None, ids=None):
    repl = rng.random(len(seq)) < p if repl is None else repl
    ids = rng.choice(vocab_ids, len(seq)) if ids is None else ids
    return [int(i) for i in np.where(repl, ids, seq)], repl, ids

  k = int(shots[int(rng.integers(len(shots)))])
  rates = corrupt.rates()
  examples = []
  for r in [rates[i] for i in np.sort(rng.choice(len(rates), k, replace=False))]:
    xi, repl, ids = noisy(x, r)
    yi = noisy(y, r, repl, ids)[0] if n == m else noisy(y, r)[0]
    examples.append((xi, yi))
  query = noisy(x, rng.uniform(0, max_query_noise))[0]
  return {"examples": examples, "query": query, "answer": [int(i) for i in y]}


def denoise_episode(rng, vocab_ids, **task_kw) -> Episode:
  """`denoise_task` as a training episode: the restoration prompt, then the clean output. The
  targets: the outputs of examples 2.. and the query's (the best guess for a noisy example's
  output is the consensus of the ones before it as well)."""
  t = denoise_task(rng, vocab_ids, **task_kw)
  parts = prompts.restoration_parts(t["examples"], t["query"]) + [t["answer"]]
  outputs = [i for i in range(len(parts)) if i > 0 and parts[i - 1] == prompts.EXAMPLE_OUT]
  targets = tuple(i in outputs[1:] for i in range(len(parts)))
  return Episode(tuple(parts), targets)


@functools.lru_cache(maxsize=8)
def _local_ids(tok):  # (codebook imported at the top: this runs in grain's reader threads)
  return codebook.subword_texts(tok)[0]


# The stage-0 "denoise" task's episodes: n = 2 (the n = m windows of deblur / shift / rotation)
# and 1-10 examples. Measured on the demo (BENCHMARKS.md, "V2L"): the protocol's own episodes
# (10 examples, n = 2 or 16: 270-420 tokens, one per packed row, longer than the demo's
# 384-token rows at n = 16) were not learnt in 1200 steps, these were, and an LM trained on
# them restores the n = 16 painting tasks on images too. A quarter of the episodes each with
# clean windows of all ids, of 1, 2 and 4 ids: with uniform ids only, the `:long` LM restored
# nothing on images (inpainting +0.17 dB, rotation -1.72; control +2.93 / +0.28) while the
# demo's did; with the mix both do (+1.26 / +0.15 and the demo's as before; BENCHMARKS.md,
# "Teaching the frozen LM to restore").
TRAIN_DENOISE = dict(ns=(2,), shots=tuple(range(1, corrupt.NUM_COPIES + 1)),
                     palettes=(0, 1, 2, 4))


def denoise_ids(tok, rng, **kw):
  """`(ids, loss_mask)` of one `denoise_episode` over the tokenizer's local vocabulary
  (`TRAIN_DENOISE` unless `kw` says otherwise)."""
  return episode_ids(tok, denoise_episode(rng, _local_ids(tok), **{**TRAIN_DENOISE, **kw}))


def match_classification_episode(rng, *, noise=0.25, shuffle=True) -> Episode:
  """The pipeline's "match_classify" task: V2L's classification prompt on symbol sets, the
  layout of the few-shot prompt with an image's 5 global tokens as 5 symbols (shuffled, a share
  `noise` replaced at random), 2-5 ways, 1-3 shots, shape or colour labels, the loss on the
  decided labels only (`classification_episode(decided_only=True)`): the label of the support
  example whose symbols the query shares, read through the content match that induction
  episodes form. Measured after `:long`'s suffix phase, it does not teach the 2-layer stand-in
  that match and costs what that phase gave (BENCHMARKS.md, "Few-shot classification"); kept
  for LMs that can use it."""
  return classification_episode(
      rng, way=int(rng.choice((2, 3, 5))), shot=int(rng.integers(1, 4)),
      label_set=sorted(LABEL_SETS)[int(rng.integers(len(LABEL_SETS)))], input_len=5,
      noise=noise, shuffle=shuffle, decided_only=True)


def sample_episode(rng, kinds=KINDS, ways=(2, 3, 5), shots=(1, 2, 3, 5)) -> Episode:
  """One episode of a kind drawn uniformly from `kinds` (classification: way, shot and the
  label set drawn too)."""
  bad = [k for k in kinds if k not in KINDS]
  if not kinds or bad:
    raise ValueError(f"kinds={kinds!r}: expected a non-empty subset of {KINDS}")
  kind = kinds[int(rng.integers(len(kinds)))]
  if kind == "copy":
    return copy_episode(rng, shots=int(rng.integers(1, 4)))
  if kind == "induction":
    return induction_episode(rng)
  return classification_episode(
      rng, way=int(rng.choice(ways)), shot=int(rng.choice(shots)),
      label_set=sorted(LABEL_SETS)[int(rng.integers(len(LABEL_SETS)))])


def episodes(rng, num: int, **kw) -> list[str]:
  """`num` episode texts (`sample_episode(rng, **kw).text`)."""
  if num < 0:
    raise ValueError(f"num={num}: expected >= 0")
  return [sample_episode(rng, **kw).text for _ in range(num)]


def episode_ids(tok, episode: Episode):
  """`(ids [L] int32, loss_mask [L] bool)`: bos, the parts, eos; the loss on target parts and
  eos (the format of `pipeline.format_example`). A part is text (encoded) or a list of ids."""
  ids, mask = [tok.bos_id], [False]
  for part, target in zip(episode.parts, episode.targets):
    piece = tok.encode(part) if isinstance(part, str) else [int(i) for i in part]
    ids += piece
    mask += [target] * len(piece)
  return np.asarray(ids + [tok.eos_id], np.int32), np.asarray(mask + [True], np.bool_)


def text_fewshot_tasks(seed: int, num: int, **task_kw) -> list[dict]:
  """The text-only control: `num` tasks of `classification_task(**task_kw)` from `seed`.
  Prompt each with `prompts.classification_prompt(tok, t["support"], t["query"],
  t["classes"])` and decode with `constrained.classify`; chance is 1 / way."""
  rng = np.random.default_rng(seed)
  return [classification_task(rng, **task_kw) for _ in range(num)]
