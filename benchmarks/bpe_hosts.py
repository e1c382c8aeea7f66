"""The visual BPE learner over P processes on this machine (jax.distributed on localhost).

  python benchmarks/bpe_hosts.py --codes=c100000.npy --processes=1,2 --merges=8192

Runs `python -m vlbpe_jax.bpe.learn` once per process count (P processes, one CPU device each,
each counting its 1/P of the grids; P=1 is the plain one-host learner), under `/usr/bin/time`,
and prints one JSON line per run: wall seconds, the learner's set-up / merge seconds (process
0), per process CPU seconds and peak RSS, and whether the vocabulary is byte-identical to the
first run's (null for the first). Each process should have a core of its own for the wall
times to mean speed-up.
"""

import argparse
import filecmp
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run(codes: str, processes: int, merges: int, out: str, extra) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  if processes > 1:
    env.update(VLBPE_DISTRIBUTED="1", VLBPE_NUM_PROCESSES=str(processes),
               JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}")
  tmp = tempfile.mkdtemp()
  cmd = [sys.executable, "-m", "vlbpe_jax.bpe.learn", f"--codes={codes}", f"--out={out}",
         f"--merges={merges}", "--no_progress", *extra]
  t0 = time.perf_counter()
  procs = []
  for i in range(processes):
    tf = os.path.join(tmp, f"time{i}")
    procs.append((subprocess.Popen(["/usr/bin/time", "-f", "%U %S %M", "-o", tf, *cmd],
                                   env=dict(env, VLBPE_PROCESS_ID=str(i)),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                  tf))
  results = []
  for p, tf in procs:
    stdout, stderr = p.communicate()
    if p.returncode:
      raise SystemExit(f"learn failed (rc {p.returncode}):\n{stderr[-3000:]}")
    user, sys_, rss_kb = open(tf).read().split()[-3:]
    results.append(dict(json.loads(stdout.strip().splitlines()[-1]),
                        cpu_s=round(float(user) + float(sys_), 1),
                        peak_rss_gb=round(int(rss_kb) / 2**20, 3)))
  wall = time.perf_counter() - t0
  r0 = results[0]
  return dict(processes=processes, wall_s=round(wall, 1), setup_s=r0["setup_s"],
              merge_s=r0["merge_s"], merges=r0["merges"], exchange_s=r0.get("exchange_s", 0),
              cpu_s=[r["cpu_s"] for r in results],
              peak_rss_gb=[r["peak_rss_gb"] for r in results])


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--codes", required=True)
  ap.add_argument("--processes", default="1,2")
  ap.add_argument("--merges", type=int, default=8192)
  ap.add_argument("--args", default="--alpha=1 --sigma=1 --base_vocab_size=8192",
                  help="more arguments of bpe.learn")
  args = ap.parse_args()
  outdir = tempfile.mkdtemp()
  first = None
  for p in [int(x) for x in args.processes.split(",")]:
    out = os.path.join(outdir, f"bpe_{p}.json")
    row = run(args.codes, p, args.merges, out, args.args.split())
    first = first or out
    row["identical"] = None if first == out else filecmp.cmp(first, out, shallow=False)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
