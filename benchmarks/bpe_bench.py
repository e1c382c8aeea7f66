"""Visual BPE speed and compression on the anchors' synthetic corpus (side by side with them).

  .venv/bin/python benchmarks/bpe_bench.py --n 1000 --merges 400
  .venv/bin/python benchmarks/bpe_bench.py --n 4000 --merges 2000 --alpha 0

Prints one JSON line: learning time (whole learn call incl. jit compiles and first counts, and
the merge loop alone), merges/s both ways, held-out encoding images/s and cells per token.
The anchors: ../shared/anchors/beingvl_vbpe/bench_anchor.py (Being-VL numba learner) and
../shared/anchors/hf_tokenizers_bpe/bench_hf_bpe.py (Rust tokenizers BPE on flattened grids).
"""

import argparse
import hashlib
import json
import os
import platform
import resource
import sys
import time

T_START = time.perf_counter()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from vlbpe_jax.bpe import VisualBPE  # noqa: E402
from vlbpe_jax.bpe import vocab as vocab_lib  # noqa: E402

ANCHOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                      "anchors", "beingvl_vbpe")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--n", type=int, default=1000, help="training grids")
  ap.add_argument("--merges", type=int, default=400)
  ap.add_argument("--alpha", type=float, default=1.0)
  ap.add_argument("--sigma", type=float, default=0.5)
  ap.add_argument("--offsets", default="0,1;1,0")
  ap.add_argument("--s_prior_count", type=float, default=0.0, help="k of S's shrinkage")
  ap.add_argument("--heldout", type=int, default=1000)
  ap.add_argument("--vocab", type=int, default=8192)
  ap.add_argument("--out", default="", help="also save the vocabulary JSON here")
  args = ap.parse_args()
  sys.path.insert(0, ANCHOR)
  from synthetic_corpus import corpus_digest, make_corpus  # pylint: disable=import-outside-toplevel

  t = time.perf_counter()
  train, heldout = make_corpus(args.n, args.heldout, args.vocab)
  corpus_s = time.perf_counter() - t
  t = time.perf_counter()
  bpe, timing = VisualBPE.learn(train, base_vocab_size=args.vocab, num_merges=args.merges,
                                alpha=args.alpha, sigma=args.sigma,
                                offsets=vocab_lib.parse_offsets(args.offsets), progress=False,
                                return_timing=True, s_prior_count=args.s_prior_count)
  learn_s = time.perf_counter() - t
  done = len(bpe.merges)
  t = time.perf_counter()
  enc = bpe.encode(heldout)
  encode_s = time.perf_counter() - t
  assert (bpe.decode(enc) == heldout).all()
  if args.out:
    bpe.save(args.out)
  print(json.dumps({
      "impl": "vlbpe_jax_visual_bpe", "n": args.n, "merges": done, "alpha": args.alpha,
      "sigma": args.sigma, "offsets": args.offsets, "s_prior_count": args.s_prior_count,
      "learn_seconds": round(learn_s, 3), "setup_seconds": round(timing["setup_s"], 3),
      "merge_loop_seconds": round(timing["merge_s"], 3),
      "merges_per_s_total": round(done / learn_s, 2),
      "merges_per_s_loop": round(done / timing["merge_s"], 2),
      "learn_cpu_seconds": round(timing["cpu_s"], 3),
      "merges_per_cpu_s_loop": round(done / timing["merge_cpu_s"], 2),
      "process_seconds_excl_corpus": round(time.perf_counter() - T_START - corpus_s, 3),
      "encode_images_per_s": round(heldout.shape[0] / encode_s, 1),
      "heldout_tokens_per_image": round(float(enc["lengths"].mean()), 2),
      "heldout_cells_per_token": round(heldout.size / int(enc["lengths"].sum()), 4),
      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
      "merges_digest": hashlib.sha256(json.dumps(bpe.merges, sort_keys=True).encode())
                       .hexdigest()[:16],
      "corpus_digest": corpus_digest(train, heldout), "jax": jax.__version__,
      "numpy": np.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
  }))


if __name__ == "__main__":
  main()
