"""configs/tiny.py's demo with V2L's frozen LM continued on span-induction episodes.

Environment: SPAN_STEPS (3000), KV_HEADS (2), TASK ("span_induction"; "suffix_induction": the
span runs to the sequence's end), DENOISE_STEPS (500).

BENCHMARKS.md, "Few-shot classification", span episodes in V2L's frozen LM (`text_icl`): the demo's phases
of 2026-12-05 (500 whole-repeat induction steps at 3e-3, 500 denoise at 1e-3) replaced by SPAN_STEPS (3000)
"span_induction" steps at 1e-3 and 500 denoise steps; the LM with KV_HEADS (2) kv
heads (the probe's phase change was measured with 2); Being-VL's runs cut to "full" (V2L reads
none of them). The stages V2L needs:

  python -m vlbpe_jax.main --config=benchmarks/v2l_span_config.py --workdir=W \\
      --config.stages=data,text,clip,text_icl,v2l
  python -m vlbpe_jax.v2l.fewshot --config=benchmarks/v2l_span_config.py --workdir=W \\
      --config.v2l.fewshot_episodes=200
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "tiny", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "tiny.py"))
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)


def get_config(arg=None):
  c = tiny.get_config(arg)
  span = int(os.environ.get("SPAN_STEPS", "3000"))
  task = os.environ.get("TASK", "span_induction")
  c.lm.text_phases = ((span, (task,), 1e-3),
                      (int(os.environ.get("DENOISE_STEPS", "500")), ("denoise",), 1e-3))
  c.lm.runs = ("full",)
  with c.unlocked():
    c.lm.model.num_kv_heads = int(os.environ.get("KV_HEADS", "2"))
  return c
