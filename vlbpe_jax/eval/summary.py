"""The report's first table: each seed claim beside what this run measured, and a verdict.

Built when the page is built, from metrics.json and the stored per-row files, so it always
describes the current results:
  lm   `W/lm/<run>/result.json` num_questions -> binomial SE of each VQA accuracy
  dit  `W/dit/<design>/result.json` result.scores.all.overall_se (SE over generated images) and
       result.wrong_prompt.overall_se (the same images against the next prompt's scene: paired
       with the first, so the independent-sides SE of their difference is conservative)
  v2l  `W/v2l/fewshot.json` rows (one per episode) -> binomial SE of each few-shot accuracy

Verdict (`verdict`): the difference beyond 2 SE of the difference in the claimed direction ->
holds; beyond 2 SE the other way -> does not hold; otherwise, or without an error bar,
inconclusive; a metric missing from metrics.json (its stage not run) -> not run.

  rows = summary.claims(workdir, report.read_metrics(workdir))
  html = summary.to_html(rows)
"""

import dataclasses
import html as html_lib
import math
import os

from absl import logging

from vlbpe_jax import fileio

HOLDS, FAILS, INCONCLUSIVE, NOT_RUN = "holds", "does not hold", "inconclusive", "not run"
V2L_SETTINGS = ("2way_1shot", "5way_1shot")


@dataclasses.dataclass(frozen=True)
class Side:
  """One measured number: its metric, value (None: not in metrics.json), SE and count."""
  label: str
  metric: str
  value: float | None
  se: float | None = None
  n: int | None = None


@dataclasses.dataclass(frozen=True)
class Claim:
  """The seed's claim `a > b` (`sign=+1`) or `a < b` (`sign=-1`, e.g. FID)."""
  text: str
  a: Side
  b: Side
  sign: int = 1
  percent: bool = True  # accuracies; else plain numbers

  @property
  def diff(self) -> float | None:
    return None if self.a.value is None or self.b.value is None else self.a.value - self.b.value

  @property
  def diff_se(self) -> float | None:
    return None if self.a.se is None or self.b.se is None else math.hypot(self.a.se, self.b.se)

  @property
  def verdict(self) -> str:
    return verdict(self.diff, self.diff_se, self.sign)


def verdict(diff, se, sign=1) -> str:
  if diff is None:
    return NOT_RUN
  if se is None:
    return INCONCLUSIVE
  if sign * diff > 2 * se:
    return HOLDS
  if sign * diff < -2 * se:
    return FAILS
  return INCONCLUSIVE


def binomial_se(p, n) -> float | None:
  """SE of an accuracy `p` over `n` independent items; None without a count."""
  if p is None or not n:
    return None
  return math.sqrt(p * (1.0 - p) / n)


def _read(path, *keys):
  """`obj[k0][k1]...` of the JSON file at `path`, or None (no file, a torn one, no such key):
  the page still builds, that row without its error bar."""
  if not os.path.exists(path):
    return None
  try:
    v = fileio.read_json(path, what="stored result")
  except fileio.CorruptArtifactError as e:
    logging.warning("report summary: %s", e)
    return None
  for k in keys:
    if not isinstance(v, dict) or k not in v:
      return None
    v = v[k]
  return v


def _lm(workdir, metrics, run, label):
  p = metrics.get(f"lm.vqa_acc.{run}")
  n = _read(os.path.join(workdir, "lm", run, "result.json"), "num_questions")
  return Side(label, f"lm.vqa_acc.{run}", p, binomial_se(p, n), n)


_DIT_SCORES = {"geneval": ("scores", "all"), "geneval_wrong_prompt": ("wrong_prompt",)}


def _dit(workdir, metrics, design, label, kind="geneval"):
  v = metrics.get(f"dit.{kind}.{design}")
  se = n = None
  if kind in _DIT_SCORES:
    scores = _read(os.path.join(workdir, "dit", design, "result.json"), "result",
                   *_DIT_SCORES[kind])
    if v is not None and isinstance(scores, dict):
      se, n = scores.get("overall_se"), scores.get("n")
  return Side(label, f"dit.{kind}.{design}", v, se, n)


def _v2l(metrics, fewshot, name, setting, label):
  key = f"v2l.fewshot_acc{'_' + name if name else ''}.{setting}"
  group = (fewshot or {}).get("variants", {}).get(name, {}) if name else (fewshot or {}).get(
      "classify", {})
  rows = group.get(setting, {}).get("image")
  p = metrics.get(key)
  n = len(rows) if rows else None
  return Side(label, key, p, binomial_se(p, n), n)


def claims(workdir: str, metrics: dict) -> list[Claim]:
  """Every row of the summary table, in reading order."""
  full = _lm(workdir, metrics, "full", "full: BPE, 3 stages + curriculum")
  out = [
      Claim("Visual BPE beats raw VQ codes (VQA)", full,
            _lm(workdir, metrics, "no_bpe", "no BPE: raw VQ codes")),
      Claim("Staged training + curriculum beats a single stage (VQA)", full,
            _lm(workdir, metrics, "single_stage", "single stage, data mixed")),
  ]
  fm = _dit(workdir, metrics, "fm", "flow matching on CLIP features")
  vq = _dit(workdir, metrics, "vq_latent", "flow matching on VQ latents")
  out += [
      Claim("The generator follows its prompt (GenEval against the prompt's scene vs against "
            "another prompt's: CLIP features + flow matching)", fm,
            _dit(workdir, metrics, "fm", "the same images, the next prompt's scene",
                 "geneval_wrong_prompt")),
      Claim("The generator follows its prompt (the same test: VQ latents + flow matching)", vq,
            _dit(workdir, metrics, "vq_latent", "the same images, the next prompt's scene",
                 "geneval_wrong_prompt")),
      Claim("Flow matching beats MSE regression (GenEval)", fm,
            _dit(workdir, metrics, "mse", "MSE on CLIP features")),
      Claim("CLIP-feature target beats VQ-latent target (GenEval)", fm, vq),
      Claim("CLIP-feature target beats VQ-latent target (FID on CLIP, lower is better)",
            _dit(workdir, metrics, "fm", "flow matching on CLIP features", "fid_clip"),
            _dit(workdir, metrics, "vq_latent", "flow matching on VQ latents", "fid_clip"),
            sign=-1, percent=False),
  ]
  fewshot = _read(os.path.join(workdir, "v2l", "fewshot.json"))
  for s in V2L_SETTINGS:
    way = s.split("way")[0]
    chance = metrics.get(f"v2l.chance.{s}")
    out.append(Claim(f"V2L few-shot beats chance ({s.replace('_', ', ')})",
                     _v2l(metrics, fewshot, "", s, "frozen LM on V2L tokens"),
                     Side(f"chance, 1/{way}", f"v2l.chance.{s}", chance,
                          None if chance is None else 0.0)))
  for s in V2L_SETTINGS:
    out.append(Claim(f"More V2L global tokens help ({s.replace('_', ', ')})",
                     _v2l(metrics, fewshot, "global_all", s, "all global tokens"),
                     _v2l(metrics, fewshot, "", s, "the first few global tokens")))
  return out


def _value(side: Side, percent: bool) -> str:
  if side.value is None:
    return f"{html_lib.escape(side.label)}: <i>not run</i>"
  f = (lambda v: f"{v:.1%}") if percent else (lambda v: f"{v:.4g}")
  se = f" &plusmn; {f(side.se)}" if side.se else ""
  n = f" <span class='small'>(n={side.n})</span>" if side.n else ""
  return (f"{html_lib.escape(side.label)}: <b>{f(side.value)}</b>{se}{n}"
          f"<br><code class='small'>{html_lib.escape(side.metric)}</code>")


def _diff(c: Claim) -> str:
  if c.diff is None:
    return "&ndash; (not run)"
  f = (lambda v: f"{v:+.1%}") if c.percent else (lambda v: f"{v:+.4g}")
  if c.diff_se is None:
    return f"{f(c.diff)} <span class='small'>(no error bar)</span>"
  return f"{f(c.diff)} &plusmn; {f(2 * c.diff_se)[1:]}"


def to_html(rows) -> str:
  """The summary table (`id='summary'`) and the rule it applies."""
  body = "".join(
      f"<tr><td>{html_lib.escape(c.text)}</td><td>{_value(c.a, c.percent)}</td>"
      f"<td>{_value(c.b, c.percent)}</td><td>{_diff(c)}</td>"
      f"<td class='verdict {c.verdict.replace(' ', '_')}'>{c.verdict}</td></tr>" for c in rows)
  return ("<table id='summary'><tr><th>seed claim</th><th>this run</th><th>compared with</th>"
          "<th>difference &plusmn; 2 SE</th><th>verdict</th></tr>" + body + "</table>"
          "<p class='small'>Values &plusmn; one standard error (binomial over the n questions or "
          "episodes; over the n generated images for GenEval). Verdict: the difference beyond "
          "two standard errors of the difference in the claimed direction: <i>holds</i>; "
          "beyond them the other way: <i>does not hold</i>; otherwise, or without an error "
          "bar: <i>inconclusive</i>; <i>not run</i>: the stage (or that setting) has no "
          "result in this workdir. One seed: the error bars cover sampling of the test items, "
          "not training noise (<code>benchmarks/claims.py</code> repeats the LM over seeds)."
          "</p>")
