"""Tests for vlbpe_jax/data/icl.py: determinism, the classification prompt's layout, labels
consistent within an episode, loss masks, the text-only few-shot set."""

import numpy as np
import pytest

from vlbpe_jax.data import icl
from vlbpe_jax.data.text_tokenizer import TextTokenizer
from vlbpe_jax.v2l import prompts


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  texts = icl.episodes(np.random.default_rng(0), 300)
  return TextTokenizer.train(texts, vocab_size=320,
                             model_path=tmp_path_factory.mktemp("tok") / "t.model")


def test_deterministic_per_seed():
  a = icl.episodes(np.random.default_rng(3), 30)
  assert a == icl.episodes(np.random.default_rng(3), 30)
  assert a != icl.episodes(np.random.default_rng(4), 30)
  assert {t.split(" ")[0] for t in a} >= {"For", "\n###\nInput:"}  # several kinds
  assert icl.text_fewshot_tasks(5, 4, way=5) == icl.text_fewshot_tasks(5, 4, way=5)


def test_classification_episode_has_the_prompt_layout(tok):
  task = icl.classification_task(np.random.default_rng(0), way=3, shot=2, label_set="color")
  ep = icl.classification_episode(np.random.default_rng(0), way=3, shot=2, label_set="color")
  prompt = prompts.classification_prompt(tok, task["support"], task["query"], task["classes"])
  ids, mask = icl.episode_ids(tok, ep)
  answer = tok.encode(task["answer"])
  assert ids.tolist() == prompt + answer + [tok.eos_id]  # the visual prompt, then the label
  assert ids.tolist()[:-1] == tok.encode(ep.text, add_bos=True)
  assert ep.text.startswith(prompts.INSTRUCTION + " " + prompts.class_list(task["classes"]))


def test_labels_consistent_within_an_episode():
  rng = np.random.default_rng(1)
  for _ in range(20):
    t = icl.classification_task(rng, way=4, shot=3, label_set="shape", noise=0.0)
    assert len(t["classes"]) == 4 and set(t["classes"]) <= set(icl.LABEL_SETS["shape"])
    by_input = {}
    for x, label in t["support"]:
      assert by_input.setdefault(x, label) == label  # one input, one label
    assert len(by_input) == 4 and sorted(by_input.values()) == sorted(t["classes"])
    assert [lab for _, lab in t["support"]].count(t["answer"]) == 3
    assert by_input[t["query"]] == t["answer"]
    assert not set(" ".join(by_input).split()) & set(t["classes"])  # labels never inputs
  noisy = icl.classification_task(rng, way=2, shot=5, noise=0.5, input_len=8)
  assert len({x for x, _ in noisy["support"]}) > 2  # noisy instances differ


def test_loss_masks_and_copy_induction(tok):
  rng = np.random.default_rng(2)
  ep = icl.classification_episode(rng, way=2, shot=1)
  ids, mask = icl.episode_ids(tok, ep)
  labels = [p for p, t in zip(ep.parts, ep.targets) if t]
  assert len(labels) == 3 and ids.dtype == np.int32 and mask.dtype == np.bool_
  assert mask.sum() == sum(len(tok.encode(x)) for x in labels) + 1 and mask[-1]
  cp = icl.copy_episode(rng, shots=2)
  ins = [cp.parts[i + 1] for i, p in enumerate(cp.parts) if p == "<"]
  assert [p for p, t in zip(cp.parts, cp.targets) if t] == ins and len(ins) == 3
  ind = icl.induction_episode(rng)
  assert ind.parts[0] == ind.parts[1] and ind.targets == (False, True)


def test_span_induction_repeats_a_span_from_anywhere_after_filler():
  # span=True: the target is a span (>= 2 symbols) of the sequence that is not always its
  # start, and the first part ends with 0-3 filler symbols after the sequence.
  rng, starts, fillers = np.random.default_rng(4), set(), set()
  for _ in range(200):
    ep = icl.induction_episode(rng, span=True)
    first, rep = ep.parts[0].split(), ep.parts[1].split()
    assert ep.targets == (False, True) and len(rep) >= 2
    found = [i for i in range(len(first) - len(rep) + 1) if first[i:i + len(rep)] == rep]
    assert found, (first, rep)
    starts.add(found[0])
    fillers.add(len(first) - 10 if len(first) > 10 else -1)
  assert len(starts) > 5  # the span does not always start at the sequence's start
  assert max(fillers) >= 1  # sequences of 10 symbols got filler after them
  with pytest.raises(ValueError, match="min_len=1"):
    icl.induction_episode(np.random.default_rng(0), min_len=1, max_len=10, span=True)
  # span=False draws what it always drew (the demo's stage-0 episodes do not move).
  a = icl.induction_episode(np.random.default_rng(7))
  rng = np.random.default_rng(7)
  seq = " ".join(icl.SYMBOLS[i] for i in rng.integers(len(icl.SYMBOLS),
                                                       size=int(rng.integers(3, 11))))
  assert a.parts == (seq, seq)


def test_suffix_induction_repeats_the_sequence_from_a_random_symbol_to_its_end():
  # to_end=True: the target is the sequence's last k >= 2 symbols (then 0-3 filler symbols in
  # the first part), k not always the whole sequence; label words are among the symbols.
  rng, lengths, words = np.random.default_rng(5), set(), set()
  for _ in range(200):
    ep = icl.suffix_induction_episode(rng)
    first, rep = ep.parts[0].split(), ep.parts[1].split()
    assert ep.targets == (False, True) and len(rep) >= 2
    ends = [i + len(rep) for i in range(len(first) - len(rep) + 1)
            if first[i:i + len(rep)] == rep]
    assert any(len(first) - 3 <= e <= len(first) for e in ends), (first, rep)
    lengths.add(len(rep))
    words.update(first)
  assert len(lengths) > 5 and words & set(icl.LABEL_SETS["color"])
  # A span that ends anywhere is shorter on average: to_end copies more of each episode.
  mean = lambda f: np.mean([len(f(np.random.default_rng(s)).parts[1].split())  # noqa: E731
                            for s in range(300)])
  assert mean(icl.suffix_induction_episode) > 1.3 * mean(icl.span_induction_episode)
  with pytest.raises(ValueError, match="to_end=True"):
    icl.induction_episode(np.random.default_rng(0), to_end=True)


@pytest.mark.parametrize("kw, match", [
    (dict(label_set="animal"), "label_set"), (dict(way=1), "way=1"), (dict(way=9), "way=9"),
    (dict(noise=1.0), "noise=1.0"), (dict(symbols=("a",), input_len=1), "too few")])
def test_task_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    icl.classification_task(np.random.default_rng(0), **kw)


def test_kind_errors():
  with pytest.raises(ValueError, match="kinds"):
    icl.sample_episode(np.random.default_rng(0), kinds=("sort",))


def _local(tok):
  from vlbpe_jax.v2l import codebook  # pylint: disable=g-import-not-at-top
  return codebook.subword_texts(tok)[0]


@pytest.mark.parametrize("n", [2, 16])
def test_denoise_episode_is_the_restoration_prompt_with_the_clean_output(tok, n):
  # The "denoise" stage-0 episode: V2L's restoration prompt (10 noisy examples at the
  # protocol's rates, then the query) on local-vocabulary ids, the clean output as the target.
  from vlbpe_jax.v2l import corrupt  # pylint: disable=g-import-not-at-top
  vocab = _local(tok)
  ep = icl.denoise_episode(np.random.default_rng(n), vocab, ns=(n,), max_query_noise=0.0)
  ids, mask = icl.episode_ids(tok, ep)
  *prompt_parts, y = ep.parts
  blocks = [i for i, p in enumerate(prompt_parts) if p == prompts.EXAMPLE_IN]
  examples = [(prompt_parts[i + 2], prompt_parts[i + 4]) for i in blocks[:-1]]
  query = prompt_parts[blocks[-1] + 2]
  assert len(examples) == corrupt.NUM_COPIES and len(query) == n and len(y) == 2
  assert ids.tolist() == prompts.restoration_prompt(tok, examples, query) + y + [tok.eos_id]
  assert {int(i) for p in ep.parts if not isinstance(p, str) for i in p} <= set(vocab.tolist())
  # Replaced shares in line with the rates (0.50 ... 0.23 over 10 examples: ~3.6 of 10 * n).
  x = np.asarray(query)  # max_query_noise=0: the query is the clean input
  changed = sum(int(np.sum(np.asarray(xi) != x)) for xi, _ in examples)
  assert 0.15 * 10 * n <= changed <= 0.5 * 10 * n
  # The loss: the outputs of examples 2..10 and the query's clean output, plus eos.
  outs = [p for p, t in zip(ep.parts, ep.targets) if t]
  assert outs == [yi for _, yi in examples[1:]] + [y]
  assert mask.sum() == 2 * 10 + 1 and mask[-1] and not mask[:-3].all()
  if n == 2:  # same positions: an example's replaced ids are the same in input and output
    for xi, yi in examples:
      for j in np.flatnonzero(np.asarray(xi) != x):
        assert yi[j] == xi[j]


def test_denoise_consensus_is_the_target(tok):
  # What the episode teaches: the examples' majority output is the clean target (almost
  # always at these rates), while a single noisy example is often wrong.
  rng, vocab = np.random.default_rng(7), _local(tok)
  hits, single = 0, 0
  for _ in range(200):
    ep = icl.denoise_episode(rng, vocab)
    outs = [p for i, p in enumerate(ep.parts) if i and ep.parts[i - 1] == prompts.EXAMPLE_OUT]
    *ex, y = outs
    vals = [max(set(col), key=col.count) for col in map(list, zip(*ex))]
    hits += vals == list(y)
    single += list(ex[0]) == list(y)
  assert hits >= 190 and single <= 80


def test_denoise_ids_shots_and_errors(tok):
  ids, mask = icl.denoise_ids(tok, np.random.default_rng(0), shots=(3,), ns=(2,))
  assert mask.sum() == 2 * 3 + 1  # examples 2..3 and the query, then eos
  # The training default (TRAIN_DENOISE): n = 2 and 1-10 examples, so the episodes fit a
  # 384-token row and several pack into one.
  rng = np.random.default_rng(1)
  sizes = {int(icl.denoise_ids(tok, rng)[1].sum()) for _ in range(200)}
  assert sizes == {2 * k + 1 for k in range(1, 11)}
  ep = icl.denoise_episode(np.random.default_rng(2), _local(tok), **icl.TRAIN_DENOISE)
  blocks = [i for i, p in enumerate(ep.parts) if p == prompts.EXAMPLE_IN]
  assert all(len(ep.parts[i + 2]) == 2 for i in blocks)
  for kw, match in [(dict(shots=(0,)), "shots"), (dict(shots=(11,)), "shots"),
                    (dict(m=0), "m=0"), (dict(ns=()), "ns"),
                    (dict(max_query_noise=2.0), "noise")]:
    with pytest.raises(ValueError, match=match):
      icl.denoise_episode(np.random.default_rng(0), _local(tok), **kw)
  with pytest.raises(ValueError, match="1 vocab ids"):
    icl.denoise_episode(np.random.default_rng(0), [5])
  for bad in [(), (-1,), (len(_local(tok)) + 1,)]:
    with pytest.raises(ValueError, match="palettes="):
      icl.denoise_task(np.random.default_rng(0), _local(tok), palettes=bad)


def test_denoise_palettes_draw_the_clean_windows_from_a_few_ids(tok):
  # palettes=(k,): the clean input and output use at most k ids (an image map's windows repeat
  # its background's few tokens); the noise ids still come from the whole vocabulary.
  vocab = _local(tok)
  rng = np.random.default_rng(3)
  noise_ids, sizes = set(), set()
  for _ in range(100):
    t = icl.denoise_task(rng, vocab, ns=(16,), palettes=(2,), max_query_noise=0.0)
    clean = set(t["query"]) | set(t["answer"])  # max_query_noise=0: the query is the clean x
    sizes.add(len(clean))
    noise_ids |= {i for xi, yi in t["examples"] for i in xi + yi} - clean
  assert sizes == {2} and len(noise_ids) > len(vocab) // 2  # 18 draws of 2 ids
  # Without palettes (0, the default) the 18 clean ids are drawn from the whole vocabulary.
  t = icl.denoise_task(np.random.default_rng(3), vocab, ns=(16,), max_query_noise=0.0)
  assert len(set(t["query"]) | set(t["answer"])) > 8
  # A mix draws a size per task.
  ks = {len(set(t["query"]) | set(t["answer"])) for t in (
      icl.denoise_task(rng, vocab, ns=(16,), palettes=(1, 4), max_query_noise=0.0)
      for _ in range(100))}
  assert 1 in ks and 4 in ks and ks <= {1, 2, 3, 4}


def test_shuffled_classification_keeps_each_class_a_symbol_set():
  rng = np.random.default_rng(5)
  orders = 0
  for _ in range(30):
    t = icl.classification_task(rng, way=3, shot=3, input_len=5, noise=0.0, shuffle=True)
    sets = {}
    for x, label in t["support"] + [(t["query"], t["answer"])]:
      sets.setdefault(label, []).append(x.split())
    protos = [sorted(xs[0]) for xs in sets.values()]
    assert len({tuple(p) for p in protos}) == 3  # distinct as sets
    for xs in sets.values():
      assert all(sorted(x) == sorted(xs[0]) for x in xs)  # noise 0: one set per class...
      orders += len({tuple(x) for x in xs}) > 1  # ...in orders that vary
  assert orders > 45
  # Without shuffle (the default) each class's instances keep its prototype's order: with
  # noise 0, one string per class.
  t = icl.classification_task(np.random.default_rng(5), way=2, shot=3, noise=0.0)
  for label in t["classes"]:
    assert len({x for x, y in t["support"] if y == label}) == 1


def test_decided_only_trains_the_labels_the_examples_decide(tok):
  for seed in range(20):
    task = icl.classification_task(np.random.default_rng(seed), way=3, shot=2)
    ep = icl.classification_episode(np.random.default_rng(seed), way=3, shot=2,
                                     decided_only=True)
    labels = [y for _, y in task["support"]] + [task["answer"]]
    trained = [p for p, t in zip(ep.parts, ep.targets) if t]
    want = [y for i, y in enumerate(labels) if y in labels[:i]]
    assert trained == want and trained[-1] == task["answer"]  # the query's always
    assert len(trained) == 4  # each class's second example and the query
    everything = icl.classification_episode(np.random.default_rng(seed), way=3, shot=2)
    assert everything.parts == ep.parts and sum(everything.targets) == 7
  # 1-shot: the query's label alone.
  ep = icl.classification_episode(np.random.default_rng(0), way=5, decided_only=True)
  assert sum(ep.targets) == 1 and ep.targets[-1]


def test_match_classification_episode_is_the_shuffled_decided_kind(tok):
  ways, n_targets = set(), []
  for seed in range(60):
    ep = icl.match_classification_episode(np.random.default_rng(seed))
    inputs = [ep.parts[i + 1] for i, p in enumerate(ep.parts) if p == "<"]
    assert all(len(x.split()) == 5 for x in inputs)
    ways.add(ep.parts[0].count(" or ") + 1)
    n_targets.append(sum(ep.targets))
    ids, mask = icl.episode_ids(tok, ep)
    assert mask[-1] and mask[-2]  # the query's label (its last piece), then eos
  assert ways == {2, 3, 5} and min(n_targets) == 1 and max(n_targets) > 3
