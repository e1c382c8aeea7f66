"""Runs a command and prints its CPU seconds (user + sys of it and its children) and wall time.

  .venv/bin/python benchmarks/cpu_time_of.py .venv-anchor/bin/python \
      ../shared/anchors/beingvl_vbpe/bench_anchor.py --n 1000 --merges 400 --threads 2

On a machine shared with other jobs the CPU seconds of a run vary less than its wall time; the
anchors' harnesses report wall time only (their CPU seconds here include their set-up).
"""

import json
import resource
import subprocess
import sys
import time


def main():
  t = time.perf_counter()
  rc = subprocess.call(sys.argv[1:])
  ru = resource.getrusage(resource.RUSAGE_CHILDREN)
  print(json.dumps({"cpu_seconds": round(ru.ru_utime + ru.ru_stime, 3),
                    "wall_seconds": round(time.perf_counter() - t, 3), "returncode": rc}))


if __name__ == "__main__":
  main()
