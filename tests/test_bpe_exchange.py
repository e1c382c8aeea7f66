"""The visual BPE learner over several hosts (threads sharing an in-process allgather here;
tests/test_multiprocess.py runs it across jax.distributed processes): every host gets the
vocabulary of one host learning from all the grids, bit for bit."""

import concurrent.futures

import numpy as np
import pytest

from test_bpe import patch_grids
from vlbpe_jax.bpe import VisualBPE
from vlbpe_jax.bpe import exchange as exchange_lib
from vlbpe_jax.bpe import learner
from vlbpe_jax.bpe import vocab as vocab_lib


def learn_on_hosts(grids, num_hosts, **kw):
  """Each of `num_hosts` threads learns from its shard; returns their (bpe, timing)."""
  group = exchange_lib.ThreadGroup(num_hosts)

  def host(i):
    ex = group.exchange(i)
    return VisualBPE.learn(grids[ex.shard(grids.shape[0])], exchange=ex, return_timing=True,
                           progress=False, **kw)

  with concurrent.futures.ThreadPoolExecutor(num_hosts) as pool:
    return list(pool.map(host, range(num_hosts)))


@pytest.mark.parametrize("num_hosts", [2, 3])
def test_hosts_learn_the_vocabulary_of_one_host(num_hosts):
  g = patch_grids(seed=5, n=41, noise=0.2)  # 41 grids: shards of unequal size
  for offsets, alpha in (("0,1;1,0", 1.0), ("0,1;1,0;1,1;1,-1", 0.0)):
    kw = dict(base_vocab_size=32, num_merges=120, alpha=alpha, sigma=0.7,
              offsets=vocab_lib.parse_offsets(offsets), min_count=2)
    want = VisualBPE.learn(g, progress=False, **kw)
    got = learn_on_hosts(g, num_hosts, **kw)
    for bpe, timing in got:
      assert bpe.merges == want.merges  # ids, pairs, offsets, counts, merged, F, S, P
      assert timing["exchange_calls"] >= len(want.merges)
    assert len(want.merges) == 120
  # Threads on each host too (every merge threaded): shards of shards, the same vocabulary.
  with pytest.MonkeyPatch.context() as m:
    m.setattr(learner, "THREAD_MIN_COUNT", 1)
    got = learn_on_hosts(g, num_hosts, threads=2, **kw)
  assert all(bpe.merges == want.merges for bpe, _ in got)


def test_hosts_two_pass_first_count_and_recounts(monkeypatch):
  """min_count 7 over 2 hosts: the first count pools candidates (a host's >= 4) and counts them
  exactly; KEEP_CELLS=1 (storage threshold = number of cells) forces recounts over the hosts."""
  g = patch_grids(seed=3, n=40, noise=0.2)
  kw = dict(base_vocab_size=32, num_merges=150, min_count=7,
            offsets=vocab_lib.parse_offsets("0,1;1,0"))
  want = VisualBPE.learn(g, progress=False, **kw)
  got = learn_on_hosts(g, 2, **kw)
  assert all(bpe.merges == want.merges for bpe, _ in got)
  with monkeypatch.context() as m:
    m.setattr(learner, "KEEP_CELLS", 1)
    got = learn_on_hosts(g, 2, **kw)
  assert all(bpe.merges == want.merges and t["recounts"] >= 2 for bpe, t in got)


def test_exchange_sums_runs_and_rejects_bad_input():
  group = exchange_lib.ThreadGroup(2)
  keys = [np.array([5, 2**40, 5, -3], np.int64), np.array([2**40, 7], np.int64)]
  vals = [np.array([1, 2, 3, -4]), np.array([10, 20])]
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    outs = list(pool.map(lambda i: group.exchange(i).sum_runs(keys[i], vals[i], [i + 1]),
                         range(2)))
  for k, v, extra in outs:
    np.testing.assert_array_equal(k, [-3, 5, 7, 2**40])
    np.testing.assert_array_equal(v, [-4, 4, 20, 12])
    assert extra == [3]
  one = exchange_lib.Exchange(1, 0)
  assert [one.shard(10)] == [slice(0, 10)]
  assert [exchange_lib.Exchange(3, i).shard(10) for i in range(3)] == [
      slice(0, 4), slice(4, 7), slice(7, 10)]
  with pytest.raises(ValueError, match="2 of 2"):
    exchange_lib.Exchange(2, 2)
  with pytest.raises(ValueError, match="int32"):
    one.sum_runs(np.array([1]), np.array([2**31]))
  with pytest.raises(ValueError, match="1-D"):
    one.sum_runs(np.array([1, 2]), np.array([1]))
