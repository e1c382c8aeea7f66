"""The CPU demo: shapes data -> text tokenizer -> VQ-GAN -> visual BPE -> unified LM -> CLIP
-> BLIP3-o DiT -> V2L.

  python -m vlbpe_jax.main --config=configs/tiny.py --workdir=runs/demo   # 9-16 min, 2-core CPU
  python -m vlbpe_jax.main --config=configs/tiny.py:long --workdir=runs/long   # ~29 min
  python -m vlbpe_jax.main --config=configs/tiny.py:tiny --workdir=/tmp/w   # seconds, tests
  python -m vlbpe_jax.vq.train --config=configs/tiny.py --workdir=runs/demo  # one stage alone

Any field can be overridden, e.g. `--config.bpe.num_merges=200 --config.stages=data,vq`.
"""

import ml_collections

from vlbpe_jax import config_utils


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, tiny=False, long=False)
  tiny = arg.tiny
  if tiny and arg.long:
    raise ValueError(f"config arg {arg!r}: expected at most one of tiny and long")
  # Training steps, (tiny, demo, long). The demo fits its budget (issue 16: 15 min on a 2-core
  # CPU from a fresh clone, install included) with fewer steps than its stages can use; `:long`
  # trains them ~2.5x longer, and the demo's report shows a recorded run of it beside its own
  # numbers (`longer_run`; eval/longer_run.py).
  steps = lambda t, demo, long: t if tiny else (long if arg.long else demo)
  c = ml_collections.ConfigDict()
  c.seed = 0  # one seed for data order, init and sampling; shapes scenes derive from it too
  c.stages = "data,text,vq,bpe,lm,clip,pixel_decoder,text_icl,dit,v2l"  # in order (train.py)
  # A rerun skips stages whose inputs are unchanged and recomputes the others; a training
  # stage (vq, lm) made from other inputs is refused unless named here (it and every stage
  # after it may then be deleted and retrained; "all": every stage).
  c.recompute = ""
  # Stages run at once when neither reads the other's outputs (vlbpe_jax/train.py:run_stages):
  # text, clip, pixel_decoder beside vq -> bpe -> lm; text_icl -> v2l beside lm; then dit. Every
  # result is what a one-at-a-time run gives; a run's single stage uses well under the 2 cores
  # of the machine the demo is sized for.
  # 1: one stage at a time, as a multi-process run and several GPUs or TPUs always do.
  c.stage_workers = 2
  # Device mesh; logical rules: vlbpe_jax/parallel.py:LOGICAL_AXIS_RULES. Batch sizes are
  # global and fixed by this file: each stage fits the -1 axis ("data") to its batch, i.e. to
  # the largest divisor of the batch that divides the device count, and the devices left over
  # replicate its shards (an added "replica" axis), e.g. batch 4 on 8 devices: data=4,
  # replica=2; on 6: data=2, replica=3 (parallel.py:plan_mesh, logged as "mesh ..."). Explicit
  # sizes are kept: their product must be the device count and split every batch.
  c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
  # A recorded run of `:long` (benchmarks/readme_results.py --longer_run_out), shown beside this
  # run's numbers in the report's "Run" section; "" = none. Relative to the repository.
  c.longer_run = "" if tiny or arg.long else "docs/longer_run.json"
  # A recorded run of benchmarks/claims.py over LM seeds (its --record_out), shown below the
  # claims with whether it was made with this config; "" = none. Relative to the repository.
  c.claims_record = "" if tiny or arg.long else "docs/claims.json"

  c.data = dict(
      resolution=64,  # shapes scenes are resolution x resolution RGB
      num_train=48 if tiny else 2000,  # examples per split (TFDS array_record)
      num_validation=16 if tiny else 200,
      num_test=16 if tiny else 200,  # the test split holds the held-out compositions
      report_examples=4 if tiny else 8,  # sample scenes shown in the report
  )
  c.tokenizer = dict(
      vocab_size=512,  # upper bound: shapes text needs ~100 words + 256 byte-fallback pieces
      model_type="unigram",  # sentencepiece model type ("unigram" or "bpe")
      icl_texts=200,  # in-context episodes (data/icl.py) added to its training texts
  )

  c.vq = dict(
      # autoencoder.VARIANTS: sizes, f=4. tiny_p4_patch's encoder codes each 4x4 patch alone,
      # so a flat background is one code per tone and BPE compresses 4.5 cells/token (taming's
      # global encoder: 55-64 codes per tone, 1.4 cells/token; BENCHMARKS.md, "Codes per flat
      # region"); :long's 6400 steps keep validation PSNR >= 30 dB with it (30.5), the demo's
      # 1200 give 26.4 dB (1600: 26.9).
      variant="mu" if tiny else "tiny_p4_patch",
      codebook_size=64 if tiny else 512,
      code_dim=8 if tiny else 16,
      l2_normalize=True,  # cosine lookup (V2L): codes stay in use
      beta=0.25,  # commitment
      dtype="float32",  # compute dtype; "bfloat16" halves activation memory on accelerators
      recon_loss="l2",  # PSNR is an L2 measure; l1 trained ~2 dB lower in 400 steps here
      perceptual_weight=0.0,  # > 0 needs perceptual_weights (a safetensors VGG16+LPIPS file)
      perceptual_weights="",
      disc_weight=0.1 if tiny else 0.0,  # > 0: PatchGAN (hinge), taming's adaptive weight
      disc_start=1,  # step from which the GAN losses count
      disc_variant="tiny",
      disc_lr=1e-4,
      restart_every=10,  # dead-code restart period (steps); 0 = never
      restart_threshold=0.1,  # restart codes used < 10% of a uniform share
      usage_decay=0.95,  # running usage per code (window ~20 steps)
      restart_until=steps(3, 900, 5000),  # no restarts after this step: codes settle
      lr=3e-3,
      warmup_steps=2 if tiny else 80,
      b1=0.9,
      b2=0.99,
      grad_clip=10.0,  # only against spikes
      batch_size=8 if tiny else 4,  # small batches, many steps: best per CPU second
      data_shards=0,  # n data shards (0: one per process): same batches on P processes, P | n
      total_steps=steps(3, 1200, 6400),
      log_every=1 if tiny else 20,
      eval_every=steps(3, 600, 3200),
      ckpt_every=steps(3, 600, 3200),
      grid_images=8,  # validation pairs in each PNG grid
      progress=not tiny,  # tqdm bar
  )

  c.bpe = dict(
      num_merges=16 if tiny else 512,  # ~ the VQ codebook size: the seed's sweet spot
      alpha=1.0,  # P = F + alpha * S (0 = plain frequency BPE)
      sigma=0.5,  # width of the Gaussian kernel of S, in grid cells
      offsets=((0, 1), (1, 0), (1, 1), (1, -1)),  # forward neighbourhood (dy, dx)
      min_count=2,  # a pair seen fewer times is never merged
      # Pseudo-count k of S's small-sample correction, S_k = S * N / (N + k) (bpe/scoring.py).
      # 0 (off, the earlier merges bit for bit): k = 2, 8, 32 left held-out compression on the
      # synthetic corpus unchanged (400 merges) or within +-0.01% (2000 merges), and k = 32 was
      # 1.6x slower (BENCHMARKS.md, "Small-sample correction of S").
      s_prior_count=0.0,
      base_vocab_size=0,  # 0 = config.vq.codebook_size
      num_token_maps=6,  # test images shown as BPE token maps in the report
  )

  c.lm = dict(
      variant="Ti",  # vlbpe_jax/lm/config.py:VARIANTS (width 128, 2 layers, 2 heads, 1 kv head)
      # LM init, data order and dropout; -1 = config.seed. Another value retrains only the lm
      # stage on the same data/VQ/BPE files (benchmarks/claims.py varies it).
      seed=-1,
      # LMConfig overrides. bf16 compute (fp32 master weights, the LMConfig default) and the
      # blockwise causal attention take the CPU step past half of the matmul rate (BENCHMARKS.md,
      # "Unified LM"); the :tiny model stays fp32 for exact tests.
      model=(dict(width=32, num_heads=2, num_kv_heads=2, mlp_dim=64, dtype="float32",
                  attention_impl="blockwise") if tiny
             else dict(attention_impl="blockwise")),
      positions="1d",  # RoPE positions: "1d", or "2d" (image tokens at their code-grid (row, col))
      seq_len=384,  # packed row: a raw-VQ example (2 + 256 image tokens + text) fits
      batch_size=8,  # global rows per step, the same for every run ("same budget")
      # The training data is split into this many shards, each process reading its share
      # (0 = one shard per process): a fixed count gives the same global batches, and
      # checkpoints that restore, for any process count dividing it. Same in vq, clip, dit,
      # dit.decoder and v2l.
      data_shards=0,
      vocab_multiple=8,  # text and visual tables padded to a multiple (vocab axis on the mesh)
      text_steps=steps(2, 50, 200),  # stage 0: text-only stand-in for the pretrained LLM
      # Stage 0's tasks, drawn per example; "icl" = text-only in-context episodes (data/icl.py)
      # so that the frozen LM V2L reads (v2l/) learns to use examples.
      text_tasks=("caption", "attributes", "vqa", "dialogue", "icl", "icl"),
      text_lr=3e-3,
      # V2L's frozen LM = stage 0 continued on these phases, ((steps, tasks, peak lr), ...),
      # each with its own schedule (the text_icl stage, W/text_icl; Being-VL's runs
      # start from stage 0 itself),
      # ending on in-context denoising in the layout of V2L's restoration prompt (data/icl.py),
      # so that the LM copies in context: without it the LM wrote wrong tokens into every
      # restoration (inpainting -0.7 dB, deblur -7.8 dB); 300 denoise steps alone or after 300
      # induction steps gave nothing (BENCHMARKS.md, "V2L tokenizer: teaching the frozen LM to
      # restore"). The demo trains 1000 denoise steps on 192-token rows: its earlier 500
      # whole-repeat induction steps at 3e-3 + 500 denoise steps formed the copy on an Intel and
      # a Zen 4 host but not on a Zen 3 one (inpainting -0.16 dB), where 1000 denoise steps on
      # the 384-token rows give +2.79 (majority-vote control +2.86) and on 192-token rows +2.61
      # (+2.65) in 162 s instead of ~400 s of the lm stage's time; colour few-shot stays at
      # chance either way (BENCHMARKS.md, "The demo on the Zen 3 host", "Denoise phase on
      # 192-token rows"). On a Zen 4 host those 1000 steps formed the copy only in part
      # (inpainting +2.18, control +3.15; deblur -7.05): 250 more on 384-token rows gave +3.12
      # and +0.01 (control +0.01) (BENCHMARKS.md, "250 more denoise steps"), in a stage off the
      # demo's critical path. :long first trains suffix-induction
      # episodes (a sequence's span, to its end, repeated after filler: only a content match
      # copies it), which teach the match few-shot prompts need: colour few-shot 2-way / 5-way
      # 1-shot 71% / 36.5% after 1000 steps at 1e-3 (at 2e-3, or in 700 steps, it does not
      # form). In the demo 1000 such steps took its lm stage from 470 to 703 s (Zen 3 host),
      # past the 15-min budget; an entry's optional 4th element is the phase's row length: 1500
      # suffix steps on 192-token rows cost 556 s there and gave colour 62% / 20%; :long with
      # 2000 of them (lm 858 s against 1043) colour 38% / 14% (BENCHMARKS.md, "Few-shot
      # classification", "The per-phase row length", ":long with 2000 suffix steps on 192-token
      # rows").
      text_phases=steps((),  # :tiny keeps the tests fast (lm/train.py's phases are tested)
                        ((1000, ("denoise",), 1e-3, 192), (250, ("denoise",), 1e-3)),
                        ((1500, ("suffix_induction",), 1e-3), (600, ("denoise",), 1e-3))),
      # The denoise episodes' clean windows: per episode k local ids (0: all of them), k drawn
      # from these (data/icl.denoise_task). All ids only: :long's LM restored nothing on images.
      denoise_palettes=(0, 1, 2, 4),
      # Their window length n (one drawn per episode) and number of examples. n = 2 with 1-10
      # examples is learnt; the protocol's own (n = 16, 10 examples: 420 tokens, longer than a
      # 384-token row) was not in 1200 steps, yet the n = 2 LM restores the n = 16 painting
      # windows on images too (BENCHMARKS.md, "Teaching the frozen LM to restore").
      denoise_ns=(2,),
      denoise_shots=tuple(range(1, 11)),
      # 1 new rows, 2 + first layers, 3 all. Steps are what buys reading the image: 4x :long's
      # (400, 400, 800) took the full run from 44.8% to 54.9% VQA and colour from 0.18 to 0.50,
      # a 3x learning rate changed nothing (BENCHMARKS.md, "Unified LM: what the model reads").
      stage_steps=steps((2, 2, 2), (40, 40, 80), (100, 100, 200)),
      stage_lrs=(3e-3, 2e-3, 1e-3),  # peak LR per stage (warm-up + cosine within each stage)
      single_stage_lr=2e-3,  # peak LR of the single-stage ablation
      stage_tasks=(("caption", "attributes"), ("vqa", "caption", "attributes"),
                   ("dialogue", "vqa")),  # curriculum per stage; repeat a task to weight it
      # (data/pipeline.py:TASKS; "look" = colour/shape/position questions only: a first phase
      # of it raised colour, cost the count, VQA flat or lower; BENCHMARKS.md, "A phase of
      # image-reading questions first").
      # VQA questions per image in one training example (0: all ~7, in random order). With all
      # of them, earlier answers name the colours and shapes a later question asks about, a
      # text shortcut past the image (BENCHMARKS.md, "Unified LM: what the model reads").
      vqa_questions=0,
      # An image's questions as branches after it (pipeline.format_example): each sees the
      # image and itself only, where evaluation asks it, and the image is paid for once. No
      # gain over the one line at 1x or 4x the steps (BENCHMARKS.md, "An image's questions as
      # branches"); needs attention_impl "blockwise" or a masked one (not splash).
      vqa_branches=False,
      first_frac=0.25,  # stage 2 unfreezes the first ceil(25%) of the layers
      warmup_steps=10,  # per stage
      final_lr_frac=0.1,  # cosine decays to 10% of the peak
      grad_clip=1.0,  # global norm over the trainable gradients only
      weight_decay=0.0,
      b1=0.9,
      b2=0.95,
      log_every=1 if tiny else 10,  # metrics.jsonl period (fetched one step late)
      ckpt_every=100,  # plus at every stage end
      progress=not tiny,  # tqdm bar
      worker_count=0,  # grain worker processes (0 = in-process)
      num_eval=8 if tiny else 100,  # test images for VQA and captions (~7 questions each)
      eval_batch_size=8 if tiny else 64,
      max_answer_tokens=4,
      max_caption_tokens=16 if tiny else 48,
      # Ablations the lm stage trains (vlbpe_jax/lm/train.py:RUNS); also opt-in:
      # "staged_no_curriculum", "curriculum_no_staging" (the seed's "either alone").
      runs=("full", "no_bpe", "single_stage"),
      report_examples=2 if tiny else 3,  # test images with dialogues in the report
  )

  # BLIP3-o's generation target: a small CLIP on the shapes data (vlbpe_jax/clip/).
  c.clip = dict(
      variant="tiny" if tiny else "mu",  # clip/model.py:VARIANTS
      # CLIPConfig overrides; 64 px / 8 = an 8x8 patch grid. conv_stem: () = the OpenAI patchify;
      # (16, 32, 64) = ViTc's stride-2 3x3 convs (clip/config.py; with twin_images below).
      model=dict(patch_size=8, conv_stem=()),
      grid=8,  # target tokens per side after average pooling (BLIP3-o: 8x8 = 64 tokens)
      batch_size=16 if tiny else 64,
      data_shards=0,  # as lm.data_shards: 0 = one per process
      # Zero-shot colour is ~100% from ~200 steps (shape stays at chance); the demo keeps 200:
      # 100 gave colour 51% and the DiT's decoder ceiling 0.20 (0.64 at 200).
      total_steps=2 if tiny else 200,
      lr=1e-3,
      # Hard-negative captions (NegCLIP): each pair's caption with one object's shape and/or
      # colour changed joins the image->text softmax; () = plain InfoNCE. ("shape",) for 200-800
      # steps left zero-shot shape at chance (BENCHMARKS.md, "Why CLIP + FM fails here").
      hard_negatives=(),
      # Hard-negative images: each scene with its twin (one object's shape and/or colour
      # changed, rendered) as a second pair; () = none. ("shape",) with model.conv_stem=
      # (16, 32, 64) and 2000 steps learns shape (78.7% by the best caption, zero-shot at
      # chance) but its grid features defeat the pixel decoder (ceiling 0.60 -> 0.00; 0.40 with
      # a 1000-step decoder); alone, neither helps (BENCHMARKS.md, "Why CLIP + FM fails here").
      twin_images=(),
      warmup_steps=1 if tiny else 20,
      final_lr_frac=0.1,
      grad_clip=1.0,
      weight_decay=0.0,
      log_every=1 if tiny else 20,
      ckpt_every=200,
      progress=not tiny,
  )
  # BLIP3-o's generator (vlbpe_jax/dit/): queries through the frozen LM condition a DiT.
  c.dit = dict(
      designs=("fm", "mse", "vq_latent"),  # the seed's study (dit/train.py:DESIGNS)
      variant="tiny",  # dit/model.py:VARIANTS ("blip3o": 1792 wide, 24 layers, 28 heads)
      model=dict(),  # DiTConfig overrides
      num_queries=64,  # learnable queries appended to the prompt (BLIP3-o: 64)
      query_init_std=0.02,
      prompt_template="Please generate image based on the following caption: {caption}",
      prompt_len=112,  # prompt tokens, left-padded (the template alone is 46); longer: refused
      batch_size=8 if tiny else 32,
      data_shards=0,  # as lm.data_shards: 0 = one per process (the decoder's: its own)
      # Per design. 4x :long's 300 steps took fm's checker score from 0.08 to 0.09
      # (BENCHMARKS.md); the demo's 60 fit its budget.
      total_steps=steps(2, 60, 300),
      lr=2e-3,  # BLIP3-o: 1e-4 cosine to 1e-5 at batch 512, for ~hundreds of thousands of steps
      warmup_steps=1 if tiny else 10,
      final_lr_frac=0.1,
      grad_clip=1.0,  # BLIP3-o: a loss spike without it
      weight_decay=0.0,
      cfg_dropout=0.1,  # conditions zeroed per sample for classifier-free guidance
      time_sampling="uniform",  # sigma ~ U over 1000 steps ("logit_normal" also)
      shift=1.0,  # timestep shift s*t/(1+(s-1)t); 1 = none
      sample_steps=4 if tiny else 30,  # Euler steps (BLIP3-o: 30)
      guidance=3.0,  # classifier-free guidance scale (BLIP3-o: 3.0)
      num_samples=2 if tiny else 4,  # samples per prompt
      num_eval=4 if tiny else 64,  # test captions scored by the checker
      report_prompts=2 if tiny else 6,
      log_every=1 if tiny else 50,
      ckpt_every=1000,
      progress=not tiny,
      # CLIP features -> pixels (vq/autoencoder.Decoder), L2; the pixel_decoder stage, beside
      # Being-VL's runs. The demo trains :long's 300 steps: at 100 (until 2026-12-07) the
      # checker's ceiling on decoder(CLIP(real)) was 0.12 and fm's GenEval 0.012; at 300, 0.63
      # and 0.11 (200: 0.34 and 0.07), for ~35 s more (BENCHMARKS.md, "The demo's decoder").
      decoder=dict(
          ch=16 if tiny else 32, ch_mult=(1, 2), num_res_blocks=1, groups=8,
          batch_size=8 if tiny else 32, data_shards=0, total_steps=2 if tiny else 300,
          lr=2e-3, warmup_steps=1 if tiny else 20, log_every=1 if tiny else 50),
  )
  # V2L (vlbpe_jax/v2l/): images as tokens of the frozen stage-0 text LM's own vocabulary,
  # read in context by that LM (few-shot shape classification).
  c.v2l = dict(
      variant="tiny" if tiny else "demo",  # v2l/model.py:VARIANTS
      model=dict(),  # V2LConfig overrides (embed_dim always comes from the CLIP)
      num_global=5 if tiny else 21,  # global tokens per image (public code: 21)
      # An entry is kept when it is in the top-`global_filter_k` of more than
      # `global_min_images` training images. The code: top-5 of > 100 of 1.28M images; scaled to
      # 2000 images that is > 0. The demo filters with its top-21 so that >= 21 entries always
      # pass (the union of each image's top-21); 48 tiny images leave 12 entries of their top-5.
      global_filter_k=5 if tiny else 21,
      global_min_images=0,
      global_dropout=0.25,  # training images whose global tokens are all masked out
      quant_weight=1.0,
      perceptual_weight=0.0,  # > 0 needs perceptual_weights (a safetensors VGG16+LPIPS file)
      perceptual_weights="",
      # The public code's GAN (rate_d 0.75 from step 10k): > 0 adds vq/discriminator.py's
      # PatchGAN (hinge) and taming's adaptive weight from step `disc_start`, Adam (0.5, 0.9) at
      # `disc_lr`. Off by default: with it a demo step took 0.97 vs 0.67 s on the CPU (the
      # discriminator and the adaptive weight run every step, weighted 0 before disc_start; the
      # compilation stays ~27 s; 8x8 maps then), and 200 demo steps are far from the code's
      # 10k-step start; the tiny runs (CI) would compile it in every pipeline test.
      # tests/test_v2l_train.py trains it.
      disc_weight=0.0,
      disc_start=1 if tiny else 100,  # the demo's half-way (the code: 10k of ~100 epochs)
      disc_variant="tiny",  # vq/discriminator.py:DISC_VARIANTS
      disc_lr=4.5e-4 if tiny else 3e-4,  # as v2l.lr (the public code: one lr for both)
      batch_size=8 if tiny else 16,
      data_shards=0,  # as lm.data_shards: 0 = one per process
      # A "demo" step (16x16 maps) at batch 16 takes ~0.4 s on the 2-core Zen 4 (+ ~10 s of
      # compilation). 200 steps: 18.4 dB, and the majority-vote control gains 3.3 dB on
      # inpainting (120 steps: 17.7 dB, 1.4 dB; BENCHMARKS.md, "V2L tokenizer"). :long: 400.
      total_steps=steps(2, 200, 400),
      # Public code: 4.5e-4 at batch 8 per GPU for 100 epochs. At 2e-3 (the demo before
      # 2026-12-05) and 1e-3 the local codebook collapses within ~10 steps to 2 of its 135
      # tokens (test usage 1.5% / 5.9%, 11.7-12.5 dB); 2e-4..5e-4 keep 25-35% of them per
      # batch (BENCHMARKS.md, "V2L tokenizer"); `v2l.codebook_usage` in the report.
      lr=4.5e-4 if tiny else 3e-4,
      warmup_steps=1 if tiny else 10,
      final_lr_frac=0.1,
      grad_clip=10.0,
      log_every=1 if tiny else 20,
      ckpt_every=1000,
      progress=not tiny,
      # Few-shot classification (queries: test single-object scenes; support: train ones).
      fewshot_ways=(2, 5),
      fewshot_shots=steps((1,), (1, 3), (1, 3, 5)),  # 5 shots: ~20 s of the demo's budget
      fewshot_episodes=4 if tiny else 50,  # episodes per (way, shot)
      fewshot_global=5,  # global tokens per image in the prompts (the seed sweeps 5 and 21)
      fewshot_batch=64,  # prompts per constrained-decoding call (each width compiles once)
      # Beside the shape table: colour labels, all num_global tokens, + local tokens (stage.py).
      variant_settings=((2, 1),) if tiny else ((2, 1), (5, 1)),  # (way, shot) of the variants
      caption_shots=2,  # few-shot captioning: train images with their caption per prompt
      vqa_shots=3,  # few-shot VQA: examples of the query's question template per prompt
      describe_queries=steps(4, 30, 50),  # test queries for captioning and for VQA
      max_caption_tokens=16 if tiny else 48,
      restore_images=steps(1, 4, 8),  # test images of each restoration task (v2l/restore.py)
      # In-context denoising prompts per n of restoration's text-only control (restore.text_only)
      restore_text_only=8 if tiny else 64,
  )
  return c
