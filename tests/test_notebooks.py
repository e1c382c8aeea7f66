"""The Colab notebooks (colab/*.ipynb) run top to bottom on a CPU, and are committed stripped.

Each notebook is executed by nbclient in its own Jupyter kernel on this interpreter, in a
temporary copy of the repository (the notebooks' first cell, `%pip install -q -e .`, builds the
package from the working directory, and setuptools writes `vlbpe_jax.egg-info` there). What the
test changes for the kernel (its kernel spec's `env`), and why:
- PIP_PREFIX, PIP_IGNORE_INSTALLED: the install goes to a temporary prefix, and pip neither
  looks at nor uninstalls the test environment's own vlbpe_jax (without PIP_IGNORE_INSTALLED,
  pip uninstalls it from the environment before installing into the prefix; the test checks
  that the environment's distribution is untouched); PIP_NO_DEPS: the test environment already
  holds the pinned dependencies (a Colab user's install resolves them).
- PYTHONPATH: the kernel imports the package from the copy that pip just built.
- TMPDIR: the notebooks' work directories (`tempfile.mkdtemp`) are removed with the test's.
- XLA_FLAGS: one CPU device, as on a Colab CPU runtime (conftest.py sets 8 for the tests), and
  LLVM -O1 (compiling dominates these tiny runs, but the DiT notebook, which trains, takes 32 s
  instead of 43 at the suite's -O0; the six notebooks 106 -> 97 s alone, 2-core host), and
  XLA's older CPU emitters, as in conftest.py (the six notebooks 103 -> 96 s alone).
A cell error fails the test with the cell's traceback; each notebook must show pictures and
print the numbers named in `CHECKS` (and pass the tests in `NUMBERS`).
"""

import importlib.metadata
import json
import os
import re
import shutil
import sys

import nbclient  # pinned in the test extra (setup.cfg)
import nbformat
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(ROOT, "colab")

# notebook -> (minimum number of inline pictures, regexes its printed output must match)
CHECKS = {
    "quickstart.ipynb": (4, [r"VQ validation PSNR: \d+\.\d+ dB", r"cells per token: \d\.\d+"]),
    "visual_bpe.ipynb": (3, [r"S = \[0\.368 1\.   \]", r"alpha = 1\.0: \d\.\d+ cells per token",
                             r"alpha = 1\.0\n  token 40 =  3 \+  5"]),  # S puts the block first
    "finetune_llama.ipynb": (1, [r"stage 1: \d+ trainable", r"stage 3: \d+ trainable",
                                 r"reloaded config equal: True", r"reloaded logits match: True"]),
    "dit_generate.ipynb": (2, [r"flow loss: \d\.\d+ -> \d\.\d+",
                               r"samples with an object of the prompt.s colour: \d\.\d+"]),
    "v2l_fewshot.ipynb": (1, [r"2-way 1-shot accuracy \(images\): \d\.\d+",
                              r"text-only control accuracy: \d\.\d+"]),
}
# notebook -> (regex with number groups, test of the numbers, what it means)
NUMBERS = {
    "finetune_llama.ipynb": (r"loss (\d+\.\d+) -> (\d+\.\d+)", lambda a, b: float(b) < float(a),
                             "every stage lowers the loss"),
    "dit_generate.ipynb": (r"prompt's colour: (\d\.\d+)", lambda hits: float(hits) >= 0.3,
                           "samples have the prompt's colour well above chance (1/8)"),
}
_COPY = ("setup.cfg", "pyproject.toml", "README.md", "vlbpe_jax", "configs", "colab")


def _copy_repo(dst):
  """The files `pip install -e .` and the notebooks read, without build outputs."""
  ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".ipynb_checkpoints")
  for name in _COPY:
    src = os.path.join(ROOT, name)
    if os.path.isdir(src):
      shutil.copytree(src, os.path.join(dst, name), ignore=ignore)
    else:
      shutil.copy2(src, os.path.join(dst, name))


def _kernel_spec(jupyter_dir, env):
  """A kernel spec named `vlbpe_test` that runs ipykernel on this interpreter with `env`."""
  path = os.path.join(jupyter_dir, "kernels", "vlbpe_test")
  os.makedirs(path)
  with open(os.path.join(path, "kernel.json"), "w") as f:
    json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
               "display_name": "vlbpe test", "language": "python", "env": env}, f)


def execute(name, tmp_path, monkeypatch):
  """Runs colab/`name` in a copy of the repo; returns (executed notebook, printed text, number
  of pictures)."""
  repo, tmp = tmp_path / "repo", tmp_path / "tmp"
  repo.mkdir()
  tmp.mkdir()
  _copy_repo(str(repo))
  _kernel_spec(str(tmp_path / "jupyter"), {
      "PIP_PREFIX": str(tmp_path / "prefix"), "PIP_IGNORE_INSTALLED": "1", "PIP_NO_DEPS": "1",
      "PYTHONPATH": str(repo),
      "TMPDIR": str(tmp),
      "XLA_FLAGS": "--xla_backend_optimization_level=1 --xla_cpu_use_fusion_emitters=false"})
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  nb = nbformat.read(str(repo / "colab" / name), as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="vlbpe_test",
                                   resources={"metadata": {"path": str(repo)}})
  client.execute()  # raises CellExecutionError (with the traceback) on a failing cell
  text, pictures = [], 0
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if out.get("output_type") == "stream":
        text.append(out["text"])
      elif "data" in out:
        pictures += "image/png" in out["data"]
        text.append(out["data"].get("text/plain", ""))
  return nb, "".join(text), pictures


def _installed():
  """The test environment's vlbpe_jax distributions: location, files, source (editable: where)."""
  return sorted((str(d.locate_file("")), sorted(map(str, d.files or ())),
                 d.read_text("direct_url.json") or "")
                for d in importlib.metadata.distributions(name="vlbpe_jax"))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_notebook_runs(name, tmp_path, monkeypatch):
  before = _installed()
  _, text, pictures = execute(name, tmp_path, monkeypatch)
  assert _installed() == before, "the notebook's pip install changed the test environment"
  min_pictures, patterns = CHECKS[name]
  assert pictures >= min_pictures, f"{name}: {pictures} pictures, expected >= {min_pictures}"
  for pattern in patterns:
    assert re.search(pattern, text), f"{name}: no output matches {pattern!r}:\n{text[-3000:]}"
  if name in NUMBERS:
    pattern, ok, what = NUMBERS[name]
    found = re.findall(pattern, text)
    assert found and all(ok(*np.atleast_1d(g)) for g in found), f"{name}: {what}: {found}"


def test_notebooks_are_listed_and_stripped():
  assert sorted(f for f in os.listdir(COLAB) if f.endswith(".ipynb")) == sorted(CHECKS)
  for name in CHECKS:
    nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
    nbformat.validate(nb)
    assert nb.cells[0].cell_type == "markdown", f"{name}: expected a markdown intro first"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "%pip install -q -e ." in code[0].source, f"{name}: first code cell must install"
    for i, cell in enumerate(code):
      assert cell.outputs == [] and cell.execution_count is None, (
          f"{name}: code cell {i} has outputs or an execution count; strip them "
          "(jupyter nbconvert --clear-output --inplace colab/*.ipynb)")
    for cell in nb.cells:
      assert not cell.get("attachments"), f"{name}: a cell has attachments"
