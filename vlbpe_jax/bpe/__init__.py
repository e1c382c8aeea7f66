"""Visual BPE on 2D grids of VQ codes: Being-VL's P = F + alpha * S, exact and kept in 2D.

  bpe = VisualBPE.learn(codes, base_vocab_size=V, num_merges=M, alpha=1.0, sigma=0.5)
  enc = bpe.encode(codes)      # tokens / positions / cells / lengths, raster order of anchors
  assert (bpe.decode(enc) == codes).all()
  bpe.save("bpe.json"); bpe = VisualBPE.load("bpe.json")

Algorithm (learning and encoding share every rule below)
--------------------------------------------------------
Grid. Codes `[N, H, W]` in `[0, V)`. Every token keeps a 2D footprint: it sits at its *anchor*
(its raster-first cell) and covers its other cells, which stay in the grid marked "covered by
that anchor". Merge k `(a, b, delta)` makes token `V + k` with footprint
`fp(a) | (delta + fp(b))`, anchored where a was.

Neighbours. A window of raster-forward cell offsets (default right and down; `offsets=` may add
the diagonals `(1, 1), (1, -1)` or longer steps). Two tokens are neighbours when some cell of
one and some cell of the other differ by a window offset (footprint adjacency), so horizontal,
vertical (and diagonal) neighbours stay defined after any number of merges. Each neighbouring
pair is one occurrence `(a, b, delta)`: a is the token whose anchor comes first in raster
order, b the other, delta = anchor(b) - anchor(a) (raster-forward: dy > 0 or dy == 0 < dx).

Score. n(a, b, delta) counts occurrences over all grids, N_ab = sum_delta n. Then
  F(a, b) = N_ab / max N                         (1 for the most frequent pair)
  S(a, b) = (1 / N_ab) sum_i exp(-||u_i - u_bar||^2 / 2 sigma^2)   (u_i: offsets of the
            occurrences, u_bar their mean; computed from n(a, b, .), see `scoring`)
  P(a, b) = F + alpha * S;  alpha = 0 is plain frequency BPE.
With s_prior_count = k > 0, S is shrunk for rare pairs: S_k = S * N_ab / (N_ab + k) (`scoring`;
k = 0, the default, is the plain S).
The best pair has the largest P, then the larger N_ab, then the smaller (a, b). It merges at its
dominant offset delta* (most occurrences; ties: raster-first offset). No pair with
N_ab < min_count (default 2) is merged; learning stops early when none is left.

Application. Every a at anchor p with b at anchor p + delta* becomes the new token at p. When
a != b no two such occurrences share a token. When a == b they form chains p, p + delta,
p + 2 delta, ...; anchors are taken greedily in raster order, i.e. every other one from the
chain's start (like "aaa" -> "(aa)a" in 1D BPE). The learner updates counts incrementally but
equals recounting every pair from scratch after each merge (tests/test_bpe_reference.py).

Worked example: V = 4, offsets right and down, one grid
    1 2 1 2
    3 3 3 3
Occurrences: (1, 2, (0, 1)) x2, (2, 1, (0, 1)) x1, (3, 3, (0, 1)) x3, (1, 3, (1, 0)) x2,
(2, 3, (1, 0)) x2. With alpha = 0, (3, 3) has F = 1 and wins; delta* = (0, 1). The chain of 3s
has candidate anchors (1,0), (1,1), (1,2); greedy takes (1,0) and (1,2): token 4 = "3 3"
(footprint (0,0), (0,1)) sits at (1,0) and (1,2), and (1,1), (1,3) are covered. Recount:
(1, 2, (0, 1)) x2, (2, 1, (0, 1)) x1, (1, 4, (1, 0)) x2, (2, 4, (1, -1)) x2 (cell (0,1) touches
the cell (1,1) of the 4 anchored at (1,0)), (4, 4, (0, 2)) x1. Three pairs tie at N = 2; the
smallest, (1, 2), merges next at (0, 1). With alpha > 0 all of these have S = 1 (one offset
each); a pair seen once at (0, 1) and once at (1, 0) has u_bar = (.5, .5) and
S = exp(-0.5 / (2 sigma^2)) = exp(-1) = 0.37 at sigma = 0.5.

Encoding output: tokens in raster order of anchors with their (row, col) anchors and footprint
sizes; `decode` paints each token's base codes back, so decode(encode(g)) == g for any codes in
[0, V), seen in training or not.

Implementation: one exact first count over all grids (with `mesh=`, a jitted shard_map over
the mesh's batch axes: each device counts its grids, an all_gather combines the counts; numpy
on the host otherwise; integer counts, so all agree bit for bit), then per merge only the pairs
touching the changed tokens are subtracted and added (`learner`). A pair's count only falls
after the merge that makes its newer token, so pairs below min_count are never stored. S is
scored by a numpy kernel (bit-identical on any machine), lazily, only for pairs that could still
win (`learner._Counts.select`). Encoding replays the merges with the same `grid_state` rule,
vectorised over the whole batch per merge.

Several hosts (`exchange=`, the `learn` CLI and the pipeline stage under `jax.distributed`):
each host keeps only its shard of the grids and does the grid work for it; the pair counts are
sums of exact integers over hosts (first counts in two passes, then each merge's count changes,
gathered and summed per key), so every host holds the same counts, picks the same merge and
ends with the vocabulary of one host learning from all the grids, bit for bit. Threads
(`threads=`) do the same inside one process: each thread works on its shard of the grids, and
the shards' exact changes are summed before the tables are updated once.

Modules: `vocab` (footprints), `grid_state` (the merge rule), `counting` (first counts on the
host), `sharded_counting` (the same, jitted and sharded over a mesh), `scoring` (the S kernel),
`tables` (exact sparse counters), `exchange` (sums over hosts), `learner`, `model` (VisualBPE),
`visualize`, `stage` (demo), CLIs `learn`, `encode`, `decode`. Learning, encoding and decoding
need numpy only: jax is imported for a mesh (`sharded_counting`) or several hosts (`exchange`).
"""

from vlbpe_jax.bpe.model import VisualBPE  # noqa: F401
