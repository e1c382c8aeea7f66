"""The report's claims summary, training curves and page order, on synthetic workdirs."""

import math
import os
import re

import pytest

import report_helpers
from vlbpe_jax.eval import curves
from vlbpe_jax.eval import report
from vlbpe_jax.eval import summary


@pytest.mark.parametrize("diff,se,sign,want", [
    (0.10, 0.04, 1, summary.HOLDS),        # beyond 2 SE in the claimed direction
    (-0.10, 0.04, 1, summary.FAILS),       # beyond 2 SE the other way
    (0.07, 0.04, 1, summary.INCONCLUSIVE),  # inside 2 SE
    (-0.07, 0.04, 1, summary.INCONCLUSIVE),
    (-5.0, 1.0, -1, summary.HOLDS),        # lower is better (FID)
    (5.0, 1.0, -1, summary.FAILS),
    (0.5, None, 1, summary.INCONCLUSIVE),  # no error bar
    (None, 0.1, 1, summary.NOT_RUN),
    (0.0, 0.0, 1, summary.INCONCLUSIVE),
])
def test_verdict_branches(diff, se, sign, want):
  assert summary.verdict(diff, se, sign) == want


def test_binomial_se():
  assert summary.binomial_se(0.25, 300) == pytest.approx(0.025)
  assert summary.binomial_se(0.5, None) is None and summary.binomial_se(None, 10) is None


def _by_text(rows):
  return {c.text: c for c in rows}


def test_claims_from_metrics_and_stored_rows(tmp_path):
  w = str(tmp_path)
  report_helpers.make_workdir(w)
  rows = _by_text(summary.claims(w, report.read_metrics(w)))
  got = {t: c.verdict for t, c in rows.items()}
  assert got == {
      "Visual BPE beats raw VQ codes (VQA)": summary.HOLDS,
      "Staged training + curriculum beats a single stage (VQA)": summary.INCONCLUSIVE,
      "The generator follows its prompt (GenEval against the prompt's scene vs against "
      "another prompt's: CLIP features + flow matching)": summary.HOLDS,
      "The generator follows its prompt (the same test: VQ latents + flow matching)":
          summary.INCONCLUSIVE,
      "Flow matching beats MSE regression (GenEval)": summary.FAILS,
      "CLIP-feature target beats VQ-latent target (GenEval)": summary.INCONCLUSIVE,
      "CLIP-feature target beats VQ-latent target (FID on CLIP, lower is better)":
          summary.INCONCLUSIVE,
      "V2L few-shot beats chance (2way, 1shot)": summary.HOLDS,
      "V2L few-shot beats chance (5way, 1shot)": summary.INCONCLUSIVE,
      "More V2L global tokens help (2way, 1shot)": summary.FAILS,
      "More V2L global tokens help (5way, 1shot)": summary.NOT_RUN,  # variant not run there
  }
  bpe = rows["Visual BPE beats raw VQ codes (VQA)"]
  assert bpe.a.n == report_helpers.N_QUESTIONS
  assert bpe.diff_se == pytest.approx(math.hypot(math.sqrt(0.24 / 400), math.sqrt(0.24 / 400)))
  fm = rows["Flow matching beats MSE regression (GenEval)"]
  assert (fm.a.se, fm.a.n) == (0.02, 256)
  follows = rows["The generator follows its prompt (the same test: VQ latents + flow matching)"]
  assert follows.b.metric == "dit.geneval_wrong_prompt.vq_latent"
  assert (follows.b.value, follows.b.se, follows.b.n) == (0.29, 0.02, 256)
  chance = rows["V2L few-shot beats chance (2way, 1shot)"]
  assert chance.b.value == 0.5 and chance.b.se == 0.0 and chance.a.n == report_helpers.N_EPISODES
  assert chance.a.se == pytest.approx(math.sqrt(0.9 * 0.1 / 50))


def test_missing_stages_and_counts(tmp_path):
  w = str(tmp_path)
  report_helpers.make_workdir(w, stages=("vq", "lm"))
  os.remove(os.path.join(w, "lm", "no_bpe", "result.json"))  # a value without its count
  with open(os.path.join(w, "lm", "single_stage", "result.json"), "w") as f:
    f.write('{"num_questions": 4')  # torn
  rows = summary.claims(w, report.read_metrics(w))
  got = {c.text: c.verdict for c in rows}
  assert got["Visual BPE beats raw VQ codes (VQA)"] == summary.INCONCLUSIVE
  assert rows[0].b.se is None and rows[0].diff == pytest.approx(0.2)
  assert rows[1].b.se is None and rows[1].a.n == report_helpers.N_QUESTIONS
  assert all(c.verdict == summary.NOT_RUN for c in rows[2:])
  page = summary.to_html(rows)
  assert page.count("<tr>") == len(rows) + 1
  assert "(no error bar)" in page and "<i>not run</i>" in page


def test_every_summary_cell_has_a_value(tmp_path):
  w = str(tmp_path)
  for stages in [(), ("vq",), ("vq", "lm", "clip", "dit", "v2l")]:
    report_helpers.make_workdir(w, stages)
    page = summary.to_html(summary.claims(w, report.read_metrics(w)))
    cells = re.findall(r"<td[^>]*>(.*?)</td>", page)
    assert len(cells) == 5 * len(summary.claims(w, {})) and all(
        re.sub("<[^>]+>", "", c).strip() for c in cells), stages


def test_curves_follow_the_sections(tmp_path):
  w = str(tmp_path)
  report_helpers.make_workdir(w)
  cdir = os.path.join(w, "report", curves.DIR)
  assert sorted(os.listdir(cdir)) == ["clip.png", "dit.png", "lm.png", "pixel_decoder.png",
                                      "text_icl.png", "v2l.png", "vq.png"]
  labels = [label for label, _ in curves.series(w, ("text", "lm/*"))]
  assert labels == ["text", "full", "no_bpe", "single_stage"]  # stage 0 and every run
  assert [x for x, _ in curves.series(w, ("dit/*",))] == ["fm", "mse", "vq_latent"]
  report.remove_section(w, "lm")  # its logs stay on disk, its curves leave the page
  assert "lm.png" not in os.listdir(cdir)
  assert "curves/lm.png" not in open(os.path.join(w, "report", "index.html")).read()


def test_page_leads_with_results_and_ends_with_collapsed_metrics(tmp_path):
  w = str(tmp_path)
  page = open(report_helpers.make_workdir(w)).read()
  order = [page.index(s) for s in ("id='summary'", "id='curves'", "id='vq'", "id='v2l'",
                                   "<details id='all_metrics'>")]
  assert order == sorted(order)
  assert page.index("<code>vq.psnr_db</code>") > page.index("<details id='all_metrics'>")
  assert "http://" not in page and "https://" not in page  # self-contained
