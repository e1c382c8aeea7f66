"""Demo stage: learn a visual BPE on the VQ codes, encode every split, report compression.

Reads `workdir/vq/codes_{train,validation,test}.npy` (int32 [N, h, w]; train is required),
writes `workdir/bpe/bpe.json`, `workdir/bpe/tokens_{split}.npz` and `workdir/bpe/stats.json`,
and adds the "Visual BPE" report section with token maps of the first test images (rendered
with `vlbpe_jax.data.shapes.make_example(i, "test", ...)`, so codes_test[i] must be example i).

Config (`config.bpe`): num_merges, alpha, sigma, offsets, min_count, s_prior_count (0 if
absent), base_vocab_size (0: use `config.vq.codebook_size`), num_token_maps. Work already
done is reused when bpe.json was learned with the same settings and each tokens file names the
same bpe.json digest. Several processes: all learn together, each from its shard of the train
codes (`bpe.exchange`: the same vocabulary as one process), and process 0 writes every file.
Threads: `learner.default_threads` (the vocabulary does not depend on them).
"""

import html
import os

import jax
import numpy as np

from vlbpe_jax import fileio
from vlbpe_jax import parallel
from vlbpe_jax.bpe import exchange as exchange_lib
from vlbpe_jax.bpe import learner
from vlbpe_jax.bpe import model
from vlbpe_jax.bpe import visualize
from vlbpe_jax.data import shapes
from vlbpe_jax.eval import report

SPLITS = ("train", "validation", "test")


def _settings(config) -> dict:
  c = config.bpe
  base = int(c.get("base_vocab_size", 0) or 0) or int(config.vq.codebook_size)
  return dict(base_vocab_size=base, num_merges=int(c.num_merges), alpha=float(c.alpha),
              sigma=float(c.sigma), offsets=[list(o) for o in c.offsets],
              min_count=int(c.get("min_count", 2)),
              s_prior_count=float(c.get("s_prior_count", 0.0)))


def _load_matching(path, settings):
  """The vocabulary at `path` if it was learned with `settings` (all merges, or stopped early
  with no pair left), else None."""
  if not os.path.exists(path):
    return None
  bpe = model.VisualBPE.load(path)
  have = dict(base_vocab_size=bpe.base_vocab_size, alpha=bpe.alpha, sigma=bpe.sigma,
              offsets=[list(o) for o in bpe.offsets], min_count=bpe.min_count,
              s_prior_count=bpe.s_prior_count)
  want = {k: v for k, v in settings.items() if k != "num_merges"}
  if have == want and (len(bpe.merges) == settings["num_merges"] or
                       os.path.exists(path + ".stopped_early")):
    return bpe
  return None


def _learn_or_load(config, codes, path, settings):
  """(bpe, timing or None). Several processes: every one learns from its shard of `codes`
  with the counts summed over processes (`exchange`), on process 0's decision to reuse."""
  bpe = _load_matching(path, settings) if parallel.is_primary() else None
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    reuse = int(multihost_utils.broadcast_one_to_all(np.int32(bpe is not None)))
    if reuse:
      return bpe, None
    ex = exchange_lib.Exchange.from_jax()
    shard = codes[ex.shard(codes.shape[0])]
    bpe, timing = model.VisualBPE.learn(shard, exchange=ex, progress=False, return_timing=True,
                                        threads=learner.default_threads(shard.size),
                                        **settings)
  elif bpe is not None:
    return bpe, None
  else:
    mesh = parallel.mesh_from_config(config.mesh) if "mesh" in config else None
    bpe, timing = model.VisualBPE.learn(codes, mesh=mesh, progress=False, return_timing=True,
                                        threads=learner.default_threads(codes.size),
                                        **settings)
  if parallel.is_primary():
    bpe.save(path)
    if len(bpe.merges) < settings["num_merges"]:
      fileio.write_text(path + ".stopped_early", "")
  return bpe, timing


def _section_html(bpe, ratios, img_rel) -> str:
  rows = "".join(f"<tr><td>{s}</td><td>{r:.3f}</td></tr>" for s, r in ratios.items())
  merges = "".join(
      f"<tr><td>{m['id']}</td><td>{m['a']}</td><td>{m['b']}</td><td>{tuple(m['offset'])}</td>"
      f"<td>{m['count']}</td><td>{m['F']:.3f}</td><td>{m['S']:.3f}</td>"
      f"<td>{len(bpe.footprint(m['id']))}</td></tr>" for m in bpe.merges[:12])
  return (f"<p>{len(bpe.merges)} merges over a base vocabulary of {bpe.base_vocab_size} codes "
          f"(alpha={bpe.alpha}, sigma={bpe.sigma}, s_prior_count={bpe.s_prior_count}, "
          f"offsets={html.escape(str(bpe.offsets))}). "
          "Compression = grid cells per BPE token.</p>"
          f"<table><tr><th>split</th><th>cells per token</th></tr>{rows}</table>"
          f"<p><img class='pix' src='{img_rel}'><br><span class='small'>Test images and their "
          "token maps: each cell coloured by the BPE token covering it (grey: a single base "
          "code), token borders dark.</span></p>"
          "<table><tr><th>id</th><th>a</th><th>b</th><th>offset</th><th>N</th><th>F</th>"
          f"<th>S</th><th>cells</th></tr>{merges}</table>")


def run_stage(config, workdir: str) -> dict:
  """Runs (or resumes) the BPE stage; returns its metrics."""
  settings = _settings(config)
  vq_dir, bpe_dir = os.path.join(workdir, "vq"), os.path.join(workdir, "bpe")
  os.makedirs(bpe_dir, exist_ok=True)
  codes = {s: fileio.load_npy(os.path.join(vq_dir, f"codes_{s}.npy"), what="VQ codes")
           for s in SPLITS
           if os.path.exists(os.path.join(vq_dir, f"codes_{s}.npy"))}
  if "train" not in codes:
    raise ValueError(f"workdir={workdir!r}: expected {vq_dir}/codes_train.npy from the VQ stage")
  path = os.path.join(bpe_dir, "bpe.json")
  bpe, timing = _learn_or_load(config, codes["train"], path, settings)
  if not parallel.is_primary():  # the others helped learn; process 0 writes the rest
    return None
  stats_path = os.path.join(bpe_dir, "stats.json")
  if timing is not None:
    fileio.write_json(stats_path, dict(timing, merges=len(bpe.merges)))
  digest = fileio.short_digest(path)  # stored with the tokens; bpe.decode and the LM check it
  ratios = {}
  for split, grids in codes.items():
    out = os.path.join(bpe_dir, f"tokens_{split}.npz")
    enc = None
    if os.path.exists(out):
      stored = fileio.load_npz(out, what="BPE tokens")
      if str(stored["bpe_digest"]) == digest and stored["lengths"].shape[0] == grids.shape[0]:
        enc = {k: v for k, v in stored.items() if k != "bpe_digest"}
    if enc is None:
      enc = bpe.encode(grids)
      fileio.save_npz(out, bpe_digest=np.array(digest), **enc)
    ratios[split] = grids.size / max(int(enc["lengths"].sum()), 1)
  shown = codes.get("test", codes["train"])[:int(config.bpe.get("num_token_maps", 6))]
  split = "test" if "test" in codes else "train"
  images = np.stack([shapes.make_example(i, split, seed=config.seed,
                                         resolution=config.data.resolution)["image"]
                     for i in range(shown.shape[0])])
  img_rel = report.save_image(workdir, "bpe/token_map.png",
                              visualize.token_map_figure(bpe, shown, images))
  metrics = {"bpe.compression": ratios.get("test", ratios["train"]),
             "bpe.num_merges": len(bpe.merges), "bpe.vocab_size": bpe.vocab_size}
  metrics.update({f"bpe.compression_{s}": r for s, r in ratios.items()})
  if os.path.exists(stats_path):
    st = fileio.read_json(stats_path, what="BPE learning stats")
    metrics["bpe.learn_seconds"] = round(st["total_s"], 3)
  report.add_section(workdir, key="bpe", title="Visual BPE", order=30,
                     html=_section_html(bpe, ratios, img_rel), metrics=metrics)
  return metrics
