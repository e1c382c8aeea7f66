"""Pipeline stage: train the VQ (resuming), encode the shapes splits, add a report section.

  metrics = run_stage(config, workdir)

Writes `workdir/vq/codes_{train,validation,test}.npy` (int32 [N, h, w], the first
`config.data.num_<split>` shapes examples), `workdir/vq/codes_meta.json`
({"codebook_size", "grid": [h, w]}) and the "VQ-GAN" section of `workdir/report/`.
"""

import math
import os

from vlbpe_jax import fileio
from vlbpe_jax.eval import report
from vlbpe_jax.vq import input_pipeline
from vlbpe_jax.vq import metrics as metrics_lib
from vlbpe_jax.vq import tokenizer
from vlbpe_jax.vq import train

SPLITS = ("train", "validation", "test")


def run_stage(config, workdir: str) -> dict:
  """Returns the report metrics {"vq.psnr_db", "vq.ssim", "vq.codebook_usage", ...}."""
  val = train.train_and_evaluate(config, workdir)
  tok = tokenizer.Tokenizer.from_workdir(workdir)
  vq_dir = os.path.join(workdir, "vq")
  for split in SPLITS:
    images = input_pipeline.load_shapes(config, split)
    codes = tok.encode(images)
    fileio.save_npy(os.path.join(vq_dir, f"codes_{split}.npy"), codes)
  flat = metrics_lib.flat_region_codes(images, codes)  # the test split
  fileio.write_json(os.path.join(vq_dir, "codes_meta.json"),
                    {"codebook_size": tok.codebook_size, "grid": list(tok.grid)})

  n = min(8, int(config.data.num_validation))
  images = input_pipeline.load_shapes(config, "validation", n)
  rec = tok.decode(fileio.load_npy(os.path.join(vq_dir, "codes_validation.npy"),
                                   what="VQ codes")[:n])
  src = report.save_image(workdir, "vq/validation_pairs.png",
                          train.comparison_grid(images, rec, ncols=4))
  metrics = {"vq.psnr_db": val["psnr_db"], "vq.ssim": val["ssim"],
             "vq.codebook_usage": val["codebook_usage"], "vq.perplexity": val["perplexity"],
             "vq.codebook_size": tok.codebook_size, "vq.grid_h": tok.grid[0],
             "vq.grid_w": tok.grid[1], "vq.train_steps": int(config.vq.total_steps),
             # Flat regions (test split): distinct codes per constant colour, and the share of
             # its cells that get its most common code (the worst colour); 1 code, 1.0 is ideal.
             **({"vq.flat_codes_per_colour": sum(v["codes"] for v in flat.values()) / len(flat),
                 "vq.flat_top_share_min": min(v["top_share"] for v in flat.values())}
                if flat else {}),
             **({"vq.train_seconds": val["train_seconds"]}
                if math.isfinite(val["train_seconds"]) else {})}
  rows = [(k, v) for k, v in metrics.items()]
  html = (f"<p>VQ tokenizer ({config.vq.variant}, f={tok.downsample}): "
          f"{tok.resolution}px images become {tok.grid[0]}x{tok.grid[1]} grids of "
          f"{tok.codebook_size} codes. Validation pairs, original | reconstruction "
          f"(decoded from the saved codes):</p>"
          f"{report.img_tag(src, width=4 * 2 * tok.resolution * 2)}"
          f"{report.table(('metric', 'value'), rows)}"
          f"<p>Codes per flat region (test split): cells whose 3x3 neighbourhood of "
          f"{tok.downsample}x{tok.downsample}-pixel patches is one constant colour should all "
          f"get one code.</p>"
          + report.table(("colour (RGB)", "flat cells", "distinct codes", "top code's share"),
                         [(str(k), v["cells"], v["codes"], f"{v['top_share']:.1%}")
                          for k, v in flat.items()]))
  report.add_section(workdir, key="vq", title="VQ-GAN", order=20, html=html, metrics=metrics)
  return metrics
