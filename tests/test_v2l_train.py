"""V2L training (v2l/train.py) and few-shot (v2l/fewshot.py, stage.py): frozen parts bit-identical,
LM-id tokens, resume (with and without the GAN), the GAN's delayed start, sharded step =
unsharded, accuracies recomputed from the stored rows."""

import dataclasses
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlbpe_jax import parallel
from vlbpe_jax.lm import model as lm_model
from vlbpe_jax.v2l import codebook
from vlbpe_jax.v2l import corrupt
from vlbpe_jax.v2l import describe
from vlbpe_jax.v2l import fewshot
from vlbpe_jax.v2l import prompts
from vlbpe_jax.v2l import restore
from vlbpe_jax.v2l import stage
from vlbpe_jax.v2l import train
from compile_count import lowerings
from test_main import ROOT, load_config
import v2l_helpers

KG = 3  # global tokens per training image
N = 8  # training images


def _config(**v2l):
  c = load_config(os.path.join(ROOT, "configs", "tiny.py"), "tiny")
  c.data.resolution = 16  # the "tiny" V2L variant: 16 px -> 4x4 tokens
  c.v2l.batch_size = 8
  for k, v in v2l.items():
    c.v2l[k] = v
  return c


@pytest.fixture(scope="module")
def inputs():
  tok = v2l_helpers.tokenizer()
  clip, clip_params = v2l_helpers.clip(16)
  lm_ids, texts = codebook.subword_texts(tok)
  local_emb = codebook.embed_texts(clip, clip_params, texts, v2l_helpers.encode,
                                   ("a photo of a {}.",), batch_size=len(texts))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (N, 16, 16, 3), dtype=np.uint8)
  global_emb = local_emb[rng.integers(0, len(texts), (N, KG))]  # stand-in global rows
  cfg = lm_model.lm_config("mu", text_vocab=tok.vocab_size, width=32, num_heads=2,
                           num_kv_heads=2, mlp_dim=64, depth=1, dtype="float32")
  lm = lm_model.LM(cfg)
  lm_params = lm.init(v2l_helpers.key(1), jnp.zeros((1, 4), jnp.int32))["params"]
  return dict(tok=tok, clip_params=clip_params, lm_ids=lm_ids, texts=texts,
              local_emb=local_emb, images=images, global_emb=global_emb,
              lm=train.TextLM(lm, jax.tree.map(np.asarray, lm_params), tok))


def _straight_and_resumed(config, inputs, tmp_path_factory, stop):
  """`v2l.total_steps` straight through, and `stop` steps + a resumed rest (one Setup, so one
  compilation: only the run directory differs)."""
  s0 = train.setup(config, "unused", inputs["local_emb"])
  out = {}
  for name, stop_at in (("straight", None), ("resumed", stop)):
    s = dataclasses.replace(s0, run_dir=str(tmp_path_factory.mktemp(name)))
    state = train.train(config, s, inputs["images"], inputs["global_emb"], stop_at_step=stop_at)
    if stop_at is not None:
      assert int(jax.device_get(state["step"])) == stop_at
      state = train.train(config, s, inputs["images"], inputs["global_emb"])
    out[name] = (s, state)
  return out


@pytest.fixture(scope="module")
def trained(inputs, tmp_path_factory):
  """Two steps straight through, and one step + a resumed second one."""
  return _straight_and_resumed(_config(), inputs, tmp_path_factory, 1)


# The GAN from step 2 (of 4, 0-based): the resumed run stops after the first GAN step, so the
# restored discriminator and its Adam state have been trained.
GAN = dict(disc_weight=0.5, disc_start=2, total_steps=4)


@pytest.fixture(scope="module")
def trained_gan(inputs, tmp_path_factory):
  """Four GAN steps straight through, and three + a resumed fourth one."""
  return _straight_and_resumed(_config(**GAN), inputs, tmp_path_factory, 3)


def test_projector_only_trainable_and_frozen_parts_bit_identical(inputs, trained):
  s, state = trained["straight"]
  params = jax.device_get(state["params"])
  assert set(params) == {"encoder", "quant_conv", "projector", "post_quant_conv", "decoder"}
  v = len(inputs["lm_ids"])
  assert not any(x.shape[:1] == (v,) for x in jax.tree.leaves(params))  # no [V, ...] table
  assert int(jax.device_get(state["step"])) == 2
  # The local table went through the steps as `frozen` and is unchanged, as are CLIP and LM.
  np.testing.assert_array_equal(np.asarray(jax.device_get(s.frozen["local_emb"])),
                                inputs["local_emb"])
  fresh_clip = v2l_helpers.clip(16)[1]
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, inputs["clip_params"]),
               jax.tree.map(np.asarray, fresh_clip))
  init = jax.device_get(s.trainer.init(jax.random.split(jax.random.fold_in(
      jax.random.key(0), 14))[0])["params"])
  assert not np.array_equal(init["projector"]["kernel"], params["projector"]["kernel"])


def test_local_tokens_are_lm_ids_and_decode(inputs, trained):
  s, state = trained["straight"]
  idx = train.encode_ids(s, state["params"], inputs["images"])
  assert idx.shape == (N, 4, 4) and idx.min() >= 0 and idx.max() < len(inputs["lm_ids"])
  tok = inputs["tok"]
  for i in np.unique(idx):
    lm_id = int(inputs["lm_ids"][i])
    assert tok.piece_type(lm_id) == "normal" and tok.decode([lm_id]) == inputs["texts"][i]
  table = codebook.lm_to_local_table(inputs["lm_ids"], tok.vocab_size)
  np.testing.assert_array_equal(table[inputs["lm_ids"][idx]], idx)
  rec = train.decode_ids(s, state["params"], idx, inputs["global_emb"], True)
  assert rec.shape == inputs["images"].shape and rec.dtype == np.uint8


def test_encode_and_decode_compile_once(inputs, trained):
  """Restoration encodes and decodes for every task: a repeated call must reuse the compiled
  programs (a fresh jax.jit per call compiled the tokenizer each time)."""
  s, state = trained["straight"]

  def calls():
    idx = train.encode_ids(s, state["params"], inputs["images"])
    return [train.decode_ids(s, state["params"], idx, inputs["global_emb"], g)
            for g in (True, False)]

  first = calls()
  with lowerings() as lowered:
    again = calls()
  assert not lowered, f"{len(lowered)} programs lowered again"
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fixture", ["trained", "trained_gan"])
def test_resume_equals_uninterrupted(fixture, request):
  runs = request.getfixturevalue(fixture)
  a = jax.device_get(runs["straight"][1])
  b = jax.device_get(runs["resumed"][1])
  keys = {"step", "params", "opt"} | ({"disc_params", "disc_opt"} if fixture == "trained_gan"
                                      else set())
  assert set(a) == set(b) == keys
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_gan_starts_at_disc_start(inputs, trained_gan):
  """Steps 0-1: no GAN term, the discriminator unchanged; step 2: both train (v2l.disc_start)."""
  s = trained_gan["straight"][0]
  state = s.trainer.init(jax.random.split(jax.random.fold_in(jax.random.key(0), 14))[0])
  batch = {"images": inputs["images"].astype(np.float32) / 127.5 - 1.0,
           "global_emb": inputs["global_emb"]}
  key = jax.device_put(jax.random.key(1), s.trainer.repl)
  disc0 = jax.device_get(state["disc_params"])
  assert set(disc0) >= {"conv_0", "conv_out"}  # vq/discriminator.py's PatchGAN
  for step in range(3):
    state, m = s.trainer.step(state, batch, key, s.frozen)
    m, disc = jax.device_get((m, state["disc_params"]))
    assert np.isfinite(m["adaptive_weight"]) and m["adaptive_weight"] > 0
    moved = {k: not np.array_equal(disc0[k]["kernel"], disc[k]["kernel"]) for k in disc0
             if "kernel" in disc0[k]}
    if step < GAN["disc_start"]:
      assert m["gan_loss"] == 0 and m["d_loss"] == 0
      jax.tree.map(np.testing.assert_array_equal, disc0, disc)
      np.testing.assert_allclose(m["loss"], m["nll"] + m["quant_loss"], rtol=1e-6)
    else:
      # Every kernel trains (conv_out's bias may not: the hinge gradient at a bias is
      # #fake - #real logits inside (-1, 1), zero when all are).
      assert m["gan_loss"] != 0 and m["d_loss"] > 0 and all(moved.values()), moved
      np.testing.assert_allclose(m["gan_loss"],
                                 GAN["disc_weight"] * m["adaptive_weight"] * m["g_loss"],
                                 rtol=1e-5)
      np.testing.assert_allclose(m["loss"], m["nll"] + m["quant_loss"] + m["gan_loss"],
                                 rtol=1e-6)


def test_sharded_step_equals_unsharded(inputs, trained):
  s8 = trained["straight"][0]  # the config's mesh: all 8 devices on "data"
  assert parallel.batch_shards(s8.trainer.mesh) == 8
  mesh1 = parallel.mesh_from_config([("data", -1), ("fsdp", 1), ("tensor", 1)],
                                    jax.devices()[:1])
  s1 = train.setup(_config(), "unused", inputs["local_emb"], mesh=mesh1)
  batch = {"images": inputs["images"].astype(np.float32) / 127.5 - 1.0,
           "global_emb": inputs["global_emb"]}
  state = jax.device_get(s8.trainer.init(jax.random.key(0)))
  out = []
  for s in (s1, s8):
    st = jax.device_put(state, s.trainer.state_shardings)
    key = jax.device_put(jax.random.key(1), s.trainer.repl)
    st, m = s.trainer.step(st, batch, key, s.frozen)
    out.append((jax.device_get(st["params"]), float(m["loss"])))
  np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
               out[0][0], out[1][0])


def test_bad_gan_and_perceptual_without_weights_raise(tmp_path, inputs):
  with pytest.raises(ValueError, match="disc_variant='huge'"):
    train.setup(_config(disc_weight=0.1, disc_variant="huge"), str(tmp_path),
                inputs["local_emb"])
  with pytest.raises(ValueError, match="disc_start=-1"):
    train.setup(_config(disc_weight=0.1, disc_start=-1), str(tmp_path), inputs["local_emb"])
  with pytest.raises(ValueError, match="perceptual_weights"):
    train.setup(_config(perceptual_weight=0.1), str(tmp_path), inputs["local_emb"])


def test_fewshot_accuracy_is_computed_from_the_stored_rows(inputs):
  labels = ["circle", "square", "star"]
  train_y = np.asarray([labels[i % 3] for i in range(9)] + [None], object)
  test_y = np.asarray([labels[i % 3] for i in range(4)], object)
  tasks = fewshot.image_tasks(train_y, test_y, way=2, shot=2, num=3, seed=0)
  assert len(tasks) == 3
  for t in tasks:
    assert t["answer"] in t["classes"] and test_y[t["query"]] == t["answer"]
    assert sorted(y for _, y in t["support"]) == sorted(t["classes"] * 2)
    assert all(train_y[i] == y for i, y in t["support"])
  assert fewshot.image_tasks(train_y, test_y, way=5, shot=1, num=3, seed=0) == []
  lm_ids = inputs["lm_ids"]
  ids = lambda i, split: [[int(lm_ids[(i * 7 + j) % len(lm_ids)])] for j in range(3)]
  rows = fewshot.run_tasks(inputs["lm"], tasks, ids, batch_size=3)
  text = fewshot.text_rows(inputs["lm"], way=2, shot=1, num=2, seed=0)
  assert all(r["pred"] in r["classes"] for r in rows + text)
  overlap = fewshot.overlap_rows(tasks, ids, seed=0)
  setting = {"way": 2, "shot": 2, "image": rows, "text": text, "overlap": overlap}
  objects = [[{"shape": "circle", "color": "red", "size": "small", "position": "left"}]] * 2
  caps = {"image": [{"query": 0, "text": "a small red circle at the left."}],
          "wrong_image": [{"query": 1, "text": "a blue star."}]}
  vqa = {"image": [{"query": 0, "question": "q", "answer": "red", "pred": "red."},
                   {"query": 1, "question": "q", "answer": "2", "pred": "3"}],
         "wrong_image": [{"query": 0, "question": "q", "answer": "red", "pred": "blue"}]}
  m = stage.fewshot_metrics({"classify": {"2way_2shot": setting},
                             "variants": {"color": {"2way_1shot": dict(setting, text=[])},
                                          "local": {"2way_1shot": dict(setting, overlap=[])}},
                             "caption": caps, "vqa": vqa}, objects)
  assert m["v2l.fewshot_acc.2way_2shot"] == sum(r["pred"] == r["answer"] for r in rows) / 3
  assert m["v2l.fewshot_acc_color.2way_1shot"] == m["v2l.fewshot_acc.2way_2shot"]
  assert np.isnan(m["v2l.fewshot_text_only_color.2way_1shot"])
  assert m["v2l.fewshot_text_only.2way_2shot"] == sum(
      r["pred"] == r["answer"] for r in text) / 2
  assert m["v2l.fewshot_overlap.2way_2shot"] == sum(
      r["pred"] == r["answer"] for r in overlap) / 3
  assert np.isnan(m["v2l.fewshot_overlap_local.2way_1shot"])
  assert m["v2l.chance.2way_2shot"] == 0.5
  assert m["v2l.caption.precision"] == m["v2l.caption.recall"] == 1.0
  assert m["v2l.caption_wrong_image.precision"] == 0.0
  assert m["v2l.vqa_acc"] == 0.5 and m["v2l.vqa_acc_wrong_image"] == 0.0
  assert np.isnan(fewshot.accuracy([]))


def test_overlap_control_picks_the_class_sharing_the_most_global_tokens():
  # Images' global tokens (entries as id lists): the query shares 2 entries with image 1
  # (a "star"), 1 with image 0 (a "circle"), none with image 2 (a "square").
  tokens = {("train", 0): [[1], [2, 3], [9]], ("train", 1): [[4], [5, 6], [2, 3]],
            ("train", 2): [[7], [8], [10]], ("train", 3): [[4], [2, 3], [11]],
            ("test", 0): [[4], [2, 3], [12]]}
  ids = lambda i, split: tokens[split, i]  # noqa: E731
  task = lambda support, answer: {"support": support, "query": 0, "answer": answer,  # noqa
                                  "classes": sorted({y for _, y in support})}
  right = task([(0, "circle"), (1, "star")], "star")
  wrong = task([(0, "circle"), (1, "star")], "circle")  # the tokens point to the other class
  shots = task([(0, "circle"), (2, "circle"), (1, "star"), (2, "star")], "star")  # summed
  rows = fewshot.overlap_rows([right, wrong, shots], ids, seed=0)
  assert [r["pred"] for r in rows] == ["star", "star", "star"]
  assert [r["tied"] for r in rows] == [1, 1, 1]
  assert fewshot.accuracy(rows) == pytest.approx(2 / 3)
  # A tie (images 1 and 3 share 2 entries each with the query) is broken at random, by seed.
  tie = task([(1, "star"), (3, "square")], "star")
  preds = {fewshot.overlap_rows([tie], ids, seed=s)[0]["pred"] for s in range(20)}
  assert preds == {"star", "square"}
  assert fewshot.overlap_rows([tie], ids, seed=3) == fewshot.overlap_rows([tie], ids, seed=3)
  assert fewshot.overlap_rows([tie], ids, seed=0)[0]["tied"] == 2
  with pytest.raises(ValueError, match="support label 'heart'"):
    fewshot.overlap_rows([dict(right, support=[(0, "heart")])], ids, seed=0)


def test_describe_tasks_prompts_and_greedy_generation(inputs):
  qa = [[{"q": "what color is the star at the left?", "a": "red"},
         {"q": "how many objects are there?", "a": "1"}],
        [{"q": "what color is the circle at the top?", "a": "blue"}],
        [{"q": "how many objects are there?", "a": "2"}]]
  assert describe.question_type(qa[0][0]["q"]) == describe.question_type(qa[1][0]["q"]) == (
      "what color is the {shape} at the {position}?")
  tasks = describe.vqa_tasks(qa, qa, shot=2, num=10, seed=0)
  assert len(tasks) == 4  # all 4 test questions: each template has >= 2 train images
  for t in tasks:
    assert len({i for i, _, _ in t["support"]}) == 2
    assert all(describe.question_type(q) == describe.question_type(t["question"])
               for _, q, _ in t["support"])
  assert describe.vqa_tasks(qa, qa, shot=3, num=10, seed=0) == []
  caps = describe.caption_tasks(5, 3, shot=2, num=4, seed=0)
  assert sorted(t["query"] for t in caps[:3]) == [0, 1, 2]
  assert all(len(set(t["support"])) == 2 for t in caps)
  with pytest.raises(ValueError, match="num_train"):
    describe.caption_tasks(1, 3, shot=2, num=4, seed=0)
  lm_ids = inputs["lm_ids"]
  ids = lambda i, split: [[int(lm_ids[(i * 5 + j) % len(lm_ids)])] for j in range(2)]
  rows = describe.run_vqa(inputs["lm"], tasks[:3], ids, num_test=3, batch_size=2)
  ctl = describe.run_vqa(inputs["lm"], tasks[:3], ids, num_test=3, batch_size=2, control=True)
  assert [r["answer"] for r in rows] == [t["answer"] for t in tasks[:3]]
  assert len(ctl) == 3 and all(isinstance(r["pred"], str) for r in rows + ctl)
  # Greedy generation is deterministic and batch-independent.
  prompt = [inputs["tok"].bos_id] + [int(i) for i in lm_ids[:7]]
  one = describe.greedy_texts(inputs["lm"], [prompt], max_new_tokens=3, batch_size=1)
  two = describe.greedy_texts(inputs["lm"], [prompt[:4], prompt], max_new_tokens=3,
                              batch_size=2)
  assert one == two[1:]


def test_restoration_text_only_control(inputs):
  # restore.text_only: the restoration prompt on random local tokens (no image), scored for
  # the LM's greedy local-token outputs and for the majority vote, which recovers the clean
  # outputs from 10 copies at the protocol's rates nearly always.
  from vlbpe_jax.data import icl  # pylint: disable=g-import-not-at-top
  lm, lm_ids = inputs["lm"], inputs["lm_ids"]
  res = restore.text_only(lm, lm_ids, num=12, seed=3, ns=(2, 16))
  assert set(res) == {"n2", "n16"}
  assert res["n2"]["majority"] >= 0.9 and res["n16"]["majority"] >= 0.9
  predict = restore.lm_predictor(lm, lm_ids, m=2)
  for n in (2, 16):
    rng = np.random.default_rng([3, n])
    tasks = [icl.denoise_task(rng, np.arange(len(lm_ids)), ns=(n,)) for _ in range(12)]
    assert all(len(t["query"]) == n and len(t["examples"]) == 10 for t in tasks)
    hits = [predict(np.asarray([t["query"]]), np.asarray([[x for x, _ in t["examples"]]]),
                    np.asarray([[y for _, y in t["examples"]]]))[0].tolist() == t["answer"]
            for t in tasks]  # one task per call
    assert res[f"n{n}"]["lm"] == np.mean(hits)
  with pytest.raises(ValueError, match="num=0"):
    restore.text_only(lm, lm_ids, num=0, seed=0)


def test_restoration_predictor_writes_local_tokens_only(inputs):
  lm_ids = inputs["lm_ids"]
  predict = restore.lm_predictor(inputs["lm"], lm_ids, m=2)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, len(lm_ids), (4, 4))
  copies = corrupt.corrupted_copies(rng, tokens, np.arange(len(lm_ids)))
  mask = corrupt.inpaint_mask(4, 4)  # rows/cols 1-2: raster positions 5, 6, 9, 10
  out = corrupt.restore_masked(predict, tokens, mask, copies, n=4, m=2)
  np.testing.assert_array_equal(out[~mask], tokens[~mask])
  assert out.min() >= 0 and out.max() < len(lm_ids)
  # Each written token is the LM's arg-max over the local tokens' ids, never a fallback.
  lm = inputs["lm"]
  flat = copies.reshape(10, -1)
  expected, rows = [], []
  for s in (0, 3, 8):  # three windows, each its own examples
    xs, ys, context = flat[:3, s:s + 4], flat[:3, s + 4:s + 6], tokens.reshape(-1)[s:s + 4]
    ids = prompts.restoration_prompt(lm.tok, [(lm_ids[x], lm_ids[y]) for x, y in zip(xs, ys)],
                                     lm_ids[context])
    logits = np.asarray(lm.model.apply({"params": lm.params}, jnp.asarray([ids])))[0, -1]
    first = lm_ids[np.argmax(logits[lm_ids])]
    second = np.asarray(lm.model.apply({"params": lm.params}, jnp.asarray([ids + [first]])))
    expected.append([np.argmax(logits[lm_ids]), np.argmax(second[0, -1][lm_ids])])
    rows.append((context, xs, ys))
  batch = [np.stack(a) for a in zip(*rows)]
  np.testing.assert_array_equal(predict(*batch), expected)
  # Rows in calls of batch_size (here 2: a full call and a partial one): the same tokens.
  np.testing.assert_array_equal(restore.lm_predictor(lm, lm_ids, m=2, batch_size=2)(*batch),
                                expected)
  with pytest.raises(ValueError, match="batch_size=0"):
    restore.lm_predictor(lm, lm_ids, m=2, batch_size=0)
  with pytest.raises(ValueError, match="lm_ids span"):
    restore.lm_predictor(lm, np.append(lm_ids, lm.model.config.vocab_size), m=2)
  images = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  bad = restore.corrupt_images("outpaint", images, corrupt.outpaint_mask(4, 4), 4)
  assert np.all(bad[:, 8:] == restore.GREY)
  np.testing.assert_array_equal(bad[:, :8], images[:, :8])
  with pytest.raises(ValueError, match="task="):
    restore.corrupt_images("denoise", images)


def test_majority_control_restores_from_the_examples_alone(inputs):
  """The control of restore.py: each window's most frequent example output. With 10 copies at
  50%...23% replacement the clean token is that mode almost everywhere, so the control writes
  back (nearly) the clean map, whatever the query holds; the LM is never called."""
  rng = np.random.default_rng(1)
  vocab = np.arange(len(inputs["lm_ids"]))
  clean = rng.integers(0, len(vocab), (8, 8))
  predict = restore.majority_predictor(m=2)
  mask = corrupt.inpaint_mask(8, 8)
  grey = np.where(mask, 0, clean)  # the query: masked positions hold one "grey" token
  out = corrupt.restore_masked(predict, grey, mask, corrupt.corrupted_copies(rng, clean, vocab),
                               n=8, m=2)
  np.testing.assert_array_equal(out[~mask], clean[~mask])
  assert np.mean(out[mask] == clean[mask]) >= 0.9
  blurred = rng.integers(0, len(vocab), (8, 8))
  copies_out, copies_in = corrupt.corrupted_copies(rng, clean, vocab, paired=blurred)
  fixed = corrupt.restore_same_positions(predict, blurred, copies_in, copies_out, m=2)
  assert np.mean(fixed == clean) >= 0.9 > np.mean(blurred == clean)
  # Ties go to the smallest id; a bad predictor name or m is refused.
  outputs = np.asarray([[[5, 2], [3, 2]], [[4, 4], [4, 1]]])  # 2 rows, 2 examples each
  np.testing.assert_array_equal(predict(None, None, outputs), [[3, 2], [4, 1]])
  np.testing.assert_array_equal(predict(None, None, outputs[:, :, :1]), [[3, 0], [4, 0]])
  with pytest.raises(ValueError, match="predictor='oracle'"):
    restore.run(None, None, num=1, seed=0, predictor="oracle")
  with pytest.raises(ValueError, match="m=0"):
    restore.majority_predictor(m=0)


def test_code_stats_count_the_local_tokens_of_the_test_images(inputs, trained):
  s, state = trained["straight"]
  ctx = types.SimpleNamespace(s=s, test={"images": inputs["images"]},
                              books=types.SimpleNamespace(lm_ids=inputs["lm_ids"]))
  stats = train.code_stats(ctx, state["params"])
  idx = train.encode_ids(s, state["params"], inputs["images"])
  _, counts = np.unique(idx, return_counts=True)
  p = counts / counts.sum()
  assert stats["usage"] == pytest.approx(len(counts) / len(inputs["lm_ids"]))
  assert stats["perplexity"] == pytest.approx(float(np.exp(-np.sum(p * np.log(p)))), rel=1e-5)
  assert train.code_stats(ctx, state["params"], idx=idx) == stats  # encoded once, by the caller
  with pytest.raises(ValueError, match=f"idx holds {len(idx) - 1} token maps"):
    train.code_stats(ctx, state["params"], idx=idx[1:])


def test_evaluation_settings_keep_a_trained_tokenizer(inputs, trained, tmp_path):
  """A trained V2L restores, and its codebooks keep their key, under other values of the fields
  only the evaluation reads (`train.EVAL_FIELDS`): `python -m vlbpe_jax.v2l.fewshot
  --config.v2l.fewshot_episodes=200` scores it on more episodes. A training field refuses."""
  s, state = trained["straight"]
  scored = _config(fewshot_episodes=200, fewshot_shots=(1, 3), restore_images=3,
                   describe_queries=7, restore_text_only=5)
  again = train.train(scored, s, inputs["images"], inputs["global_emb"])  # nothing to train
  assert int(jax.device_get(again["step"])) == int(jax.device_get(state["step"]))
  for a, b in zip(jax.tree.leaves(again["params"]), jax.tree.leaves(state["params"])):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="v2l.lr: checkpoint has"):
    train.train(_config(lr=1e-2), s, inputs["images"], inputs["global_emb"])
  os.makedirs(tmp_path / "tokenizer")
  (tmp_path / "tokenizer" / "text.model").write_bytes(b"model")
  key = train.codebook_key(_config(), str(tmp_path))
  assert train.codebook_key(scored, str(tmp_path)) == key
  assert train.codebook_key(_config(num_global=4), str(tmp_path)) != key
  assert not set(train.EVAL_FIELDS) - set(_config().v2l)  # each names a real field
