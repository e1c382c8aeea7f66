"""The report in headless Chromium: a screenshot, every image loaded, every summary cell filled,
no console error. The page comes from a synthetic workdir (tests/report_helpers.py).

Uses Debian's `chromium`; installs it with apt-get when missing, and is skipped, with the
reason printed, only where that is impossible (no apt-get, not root, no network).
"""

import html
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

import report_helpers

# Injected first in <head> of a copy of the page: records errors (script errors, images or other
# resources that fail to load, console.error), then on load writes its findings into the DOM.
_PROBE = """<script>
window.__errors = [];
window.addEventListener('error', function (e) {
  __errors.push(e.message || ('failed to load ' + (e.target.src || e.target.href)));
}, true);
window.addEventListener('unhandledrejection', function (e) { __errors.push(String(e.reason)); });
var __consoleError = console.error;
console.error = function () { __errors.push([].join.call(arguments, ' '));
                              __consoleError.apply(console, arguments); };
window.addEventListener('load', function () {
  var out = document.createElement('pre');
  out.id = '__checks';
  out.textContent = JSON.stringify({
    errors: __errors,
    images: [].map.call(document.images, function (i) {
      return [i.getAttribute('src'), i.naturalWidth]; }),
    rows: document.querySelectorAll('#summary tr').length,
    cells: [].map.call(document.querySelectorAll('#summary td'), function (td) {
      return td.textContent.trim(); })});
  document.body.appendChild(out);
});
</script>"""


def _chromium():
  """The chromium executable, installing Debian's package if needed; skips when impossible."""
  exe = shutil.which("chromium") or shutil.which("chromium-browser")
  if exe:
    return exe
  why = None
  if shutil.which("apt-get") is None:
    why = "chromium is not installed and there is no apt-get to install it"
  elif os.geteuid() != 0:
    why = "chromium is not installed and apt-get needs root"
  else:
    for cmd in (["apt-get", "install", "-y", "chromium"], ["apt-get", "update"],
                ["apt-get", "install", "-y", "chromium"]):
      r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False,
                         env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
      if cmd[1] == "install" and r.returncode == 0:
        break
    exe = shutil.which("chromium")
    if exe is None:
      why = f"apt-get install -y chromium failed: {r.stderr.strip()[-300:]}"
  if why:
    print(f"SKIP test_report_browser: {why}", file=sys.stderr)
    pytest.skip(why)
  return exe


def _run(exe, profile, *args):
  cmd = [exe, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={profile}",
         "--no-first-run", "--virtual-time-budget=5000", *args]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_report_renders_in_chromium(tmp_path):
  exe = _chromium()
  w = str(tmp_path / "w")
  index = report_helpers.make_workdir(w)
  page = open(index).read()
  probe = os.path.join(os.path.dirname(index), "_probe.html")  # beside index: same image paths
  with open(probe, "w") as f:
    f.write(page.replace("<head>", "<head>" + _PROBE, 1))
  profile = str(tmp_path / "profile")

  shot = str(tmp_path / "report.png")
  r = _run(exe, profile, f"--screenshot={shot}", "--window-size=1200,2400",
           "file://" + os.path.abspath(index))
  assert os.path.exists(shot), r.stderr[-2000:]
  pixels = np.asarray(Image.open(shot).convert("RGB"))
  assert pixels.shape[:2] == (2400, 1200) and pixels.std() > 5  # not a blank page

  r = _run(exe, profile, "--enable-logging=stderr", "--v=0", "--dump-dom",
           "file://" + os.path.abspath(probe))
  found = re.search(r'<pre id="__checks">(.*?)</pre>', r.stdout, re.S)
  assert found, f"no probe output; stderr: {r.stderr[-2000:]}"
  checks = json.loads(html.unescape(found.group(1)))
  assert checks["errors"] == []
  # The section pictures (vq, dit) and one curve per training panel, every one decoded.
  assert len(checks["images"]) == 2 + 7, checks["images"]
  assert all(width > 0 for _, width in checks["images"]), checks["images"]
  assert checks["rows"] == 1 + 11 and len(checks["cells"]) == 5 * 11
  assert all(checks["cells"]), checks["cells"]
  console = [line for line in r.stderr.splitlines() if ":CONSOLE" in line]
  assert console == [], console
