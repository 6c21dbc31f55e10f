"""Checks a config at start, so a bad value fails before any compute with a
message that names the field."""

import ml_collections

from cmal_jax import recipes, run_identity
from cmal_jax.data import shards, tasks
from cmal_jax.model import bert_init, heads
from cmal_jax.model.pixels import pixel_config
from cmal_jax.model.layers import REMAT_POLICIES

# model.moved_place: where CMAP's moved features come from (ModelConfig).
MOVED_PLACES = ('none', 'carried')


def _fail(field, value, why):
  raise ValueError(f'config.{field}={value!r}: {why}')


TASKS = ('pretrain',) + tasks.TASKS
VISUAL_INPUTS = ('regions', 'pixels')
BOX_SOURCES = ('given', 'grid')
# finetune.itm_negatives: retrieval ITM's negatives (configs/finetune.py).
ITM_NEGATIVES = ('random', 'hard')
# finetune.rerank_score: what ranks retrieval's ITC candidates.
RERANK_SCORES = ('itm', 'itm_and_itc')
RECALLS = tuple(f'{d}_r{k}' for d in ('t2i', 'i2t') for k in (1, 5, 10))
# What fine-tuning's evaluation reports per task (finetune.py); the last
# is the validation metric that picks the best checkpoint (higher is
# better).
TASK_METRICS = {'vqa': ('vqa_accuracy',), 've': ('accuracy',),
                'nlvr2': ('accuracy',), 'rec': ('accuracy',),
                'retrieval': RECALLS + ('mean_recall',)}
BEST_METRIC = {task: names[-1] for task, names in TASK_METRICS.items()}


def eval_metric_names(config):
  """The accuracies and recalls the held-out evaluation reports."""
  if config.task != 'pretrain':
    return set(TASK_METRICS[config.task])
  names = {'mlm_acc', 'itm_acc'}
  recalls = RECALLS
  names |= {f'retrieval_{r}' for r in recalls}
  if config.loss.itc > 0:
    names |= {f'retrieval_itc_{r}' for r in recalls}
  if config.cmap.enabled and config.loss.amc > 0:
    for suffix in ('', '_all_swapped'):
      names |= {f'amc_{m}_acc{suffix}' for m in ('pair', 't2r', 'r2t', 'word',
                                                  'tag')}
  return names


def validate(config: ml_collections.ConfigDict):
  """Raises ValueError naming the first invalid field."""
  m, d = config.model, config.data
  for field in ('hidden_dim', 'num_heads', 'mlp_dim', 'vocab_size',
                'max_position', 'region_feat_dim'):
    if not isinstance(m[field], int) or m[field] <= 0:
      _fail(f'model.{field}', m[field], 'must be a positive integer')
  for field in ('text_layers', 'vision_layers', 'unified_layers'):
    if not isinstance(m[field], int) or m[field] < 0:
      _fail(f'model.{field}', m[field], 'must be an integer >= 0')
  if m.hidden_dim % m.num_heads:
    _fail('model.num_heads', m.num_heads,
          f'must divide model.hidden_dim={m.hidden_dim}')
  _validate_visual(config)
  if m.get('two_stream', False) and not m.get('cross_attention', False):
    _fail('model.two_stream', m.two_stream,
          'the two-stream mode needs model.cross_attention=True')
  if m.dtype not in ('float32', 'bfloat16', 'float16'):
    _fail('model.dtype', m.dtype, 'must be float32, bfloat16 or float16')
  if m.get('moved_place', 'none') not in MOVED_PLACES:
    _fail('model.moved_place', m.moved_place,
          f'must be one of {MOVED_PLACES}')
  if m.get('head_input', 'cls') not in heads.HEAD_INPUTS:
    _fail('model.head_input', m.head_input,
          f'must be one of {heads.HEAD_INPUTS}')
  if not 0 <= m.dropout < 1:
    _fail('model.dropout', m.dropout, 'must be in [0, 1)')
  for field in ('max_text_len', 'max_regions', 'max_anchors'):
    if not isinstance(d[field], int) or d[field] <= 0:
      _fail(f'data.{field}', d[field], 'must be a positive integer')
  if d.max_text_len < 3:
    _fail('data.max_text_len', d.max_text_len, 'needs room for [CLS] x [SEP]')
  if d.max_text_len > m.max_position:
    _fail('data.max_text_len', d.max_text_len,
          f'exceeds model.max_position={m.max_position}')
  if d.on_error not in ('raise', 'skip'):
    _fail('data.on_error', d.on_error, "must be 'raise' or 'skip'")
  if (isinstance(d.max_skip_fraction, bool)
      or not isinstance(d.max_skip_fraction, (int, float))
      or not 0 <= d.max_skip_fraction <= 1):
    _fail('data.max_skip_fraction', d.max_skip_fraction,
          'must be a fraction in [0, 1]')
  if config.task not in TASKS:
    _fail('task', config.task, f'must be one of {list(TASKS)}')
  if config.task == 'pretrain':
    _validate_pretrain(config)
  else:
    _validate_finetune(config)
  for field in ('total_steps', 'batch_size', 'log_every', 'checkpoint_every'):
    if not isinstance(config[field], int) or config[field] <= 0:
      _fail(field, config[field], 'must be a positive integer')
  if not isinstance(config.stop_at_step, int) or config.stop_at_step < 0:
    _fail('stop_at_step', config.stop_at_step, 'must be an integer >= 0')
  if config.resume not in run_identity.RESUME_MODES:
    _fail('resume', config.resume,
          f'must be one of {run_identity.RESUME_MODES}')
  if not isinstance(config.max_nonfinite_steps, int) or (
      config.max_nonfinite_steps <= 0):
    _fail('max_nonfinite_steps', config.max_nonfinite_steps,
          'must be a positive integer')
  if not isinstance(config.eval.every_steps, int) or config.eval.every_steps < 0:
    _fail('eval.every_steps', config.eval.every_steps,
          'must be an integer >= 0')
  if config.eval.best_metric not in eval_metric_names(config):
    _fail('eval.best_metric', config.eval.best_metric,
          f'not a metric this recipe evaluates; one of '
          f'{sorted(eval_metric_names(config))}')
  o = config.optim
  if o.lr <= 0:
    _fail('optim.lr', o.lr, 'must be > 0')
  if not 0 <= o.warmup_fraction < 1:
    _fail('optim.warmup_fraction', o.warmup_fraction, 'must be in [0, 1)')
  if config.get('init', {}).get('bert'):  # Sizes checked before any work.
    bert_init.check_config(config.init.bert, config.model)
  if len(config.mesh.shape) not in (0, 3):
    _fail('mesh.shape', tuple(config.mesh.shape),
          "needs 3 entries, (data, fsdp, tensor), or () for the preset's")
  remat_names = ['none', *REMAT_POLICIES]
  if m.remat not in remat_names:
    _fail('model.remat', m.remat, f'must be one of {remat_names}')
  if not isinstance(config.grad_accum_steps, int) or (
      config.grad_accum_steps <= 0):
    _fail('grad_accum_steps', config.grad_accum_steps,
          'must be a positive integer')
  if config.batch_size % config.grad_accum_steps:
    _fail('grad_accum_steps', config.grad_accum_steps,
          f'must divide config.batch_size={config.batch_size}')
  if not isinstance(d.itm_group, int) or d.itm_group <= 0:
    _fail('data.itm_group', d.itm_group, 'must be a positive integer')


def _validate_read(config):
  """data.read: a known mode; own_shards reads a sharded folder of our
  records (data.dir), not a TFDS dataset nor the synthetic world."""
  d = config.data
  read = d.get('read', 'global')
  if read not in shards.READ_MODES:
    _fail('data.read', read, f'must be one of {shards.READ_MODES}')
  if read != 'own_shards':
    return
  if d.get('source', ''):
    _fail('data.read', read, f'reads the shards of a sharded data.dir, not '
          f'data.source={d.source!r}: set data.source=\'\' or '
          "data.read='global'")
  if not d.dir:
    _fail('data.read', read, "needs data.dir, a sharded folder (python -m "
          'cmal_jax.convert shard); the synthetic world data.dir=\'\' '
          'generates is not sharded')


def _validate_visual(config):
  """model.visual: the input kind, the box source, and (for pixels) the
  backbone's fields, checked by PixelConfig itself."""
  v = config.model.get('visual')
  if v is None:
    return
  if v.input not in VISUAL_INPUTS:
    _fail('model.visual.input', v.input, f'must be one of {VISUAL_INPUTS}')
  if v.input != 'pixels':
    return
  if v.boxes not in BOX_SOURCES:
    _fail('model.visual.boxes', v.boxes, f'must be one of {BOX_SOURCES}')
  try:
    cfg = pixel_config(config.model)
  except (TypeError, ValueError) as e:  # 'PixelConfig.width=0: ...'.
    field = str(e).split('=')[0].removeprefix('PixelConfig.')
    _fail(f'model.visual.{field}', v.get(field), str(e))
  if not isinstance(v.image_size, int) or v.image_size <= 0 or (
      v.image_size % cfg.patch_size):
    _fail('model.visual.image_size', v.image_size,
          f'must be a positive multiple of model.visual.patch_size='
          f'{cfg.patch_size}')
  cells = cfg.grid_size ** 2
  if v.boxes == 'given' and cells > config.data.max_regions:
    _fail('model.visual.grid_size', cfg.grid_size,
          f'an image without boxes gets its {cells} grid cells as regions, '
          f'more than data.max_regions={config.data.max_regions}; lower '
          'grid_size or raise max_regions')


# The fields of config.loss that are not objective weights; every other
# field is one (a recipe may add its own, as SemMIM adds mim and agreement).
LOSS_SETTINGS = ('amc_targets', 'amc_tag_at', 'itm_inputs',
                 'itm_corrupted_warmup', 'mlm_prob', 'mlm_modifier_prob',
                 'mrc_prob', 'mask_anchors')


def loss_weights(config):
  """{objective: weight} of a pre-training config; 0 turns one off."""
  return {k: v for k, v in config.loss.items() if k not in LOSS_SETTINGS}


def _validate_pretrain(config):
  d = config.data
  _validate_read(config)
  for field, value in (('data.itm_neg_prob', d.itm_neg_prob),
                       ('cmap.select_prob', config.cmap.select_prob),
                       ('cmap.swap_prob', config.cmap.swap_prob),
                       ('cmap.mask_prob', config.cmap.mask_prob),
                       ('loss.mlm_prob', config.loss.mlm_prob),
                       ('loss.mlm_modifier_prob',
                        config.loss.get('mlm_modifier_prob', 0.0)),
                       ('loss.mrc_prob', config.loss.mrc_prob),
                       ('loss.itm_corrupted_warmup',
                        config.loss.get('itm_corrupted_warmup', 0.0))):
    if not 0 <= value <= 1:
      _fail(field, value, 'must be a probability in [0, 1]')
  if config.cmap.swap_prob + config.cmap.mask_prob > 1:
    _fail('cmap.mask_prob', config.cmap.mask_prob,
          'swap_prob + mask_prob must be <= 1 (the rest keeps the anchor)')
  weights = loss_weights(config)
  for name, weight in weights.items():
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
      _fail(f'loss.{name}', weight, 'an objective weight must be a number')
    if weight < 0:
      _fail(f'loss.{name}', weight, 'weights must be >= 0')
  if not any(w > 0 for w in weights.values()):
    _fail('loss', 'all zero', 'enable at least one objective')
  if config.loss.amc_targets not in ('pairing', 'label', 'both'):
    _fail('loss.amc_targets', config.loss.amc_targets,
          "must be 'pairing', 'label' or 'both'")
  for field, allowed in (('amc_tag_at', ('unswapped', 'all')),
                         ('itm_inputs', ('label_blind', 'corrupted'))):
    value = config.loss.get(field, allowed[0])
    if value not in allowed:
      _fail(f'loss.{field}', value, f'must be one of {allowed}')
  # ITM's warm-up reads the CMAP pass before label-blind ITM's own
  # (objectives.pretraining_loss); corrupted ITM reads that pass throughout.
  warmup = config.loss.get('itm_corrupted_warmup', 0.0)
  if warmup > 0 and config.loss.get('itm_inputs') == 'corrupted':
    _fail('loss.itm_corrupted_warmup', warmup,
          "the warm-up only applies to label-blind ITM; with "
          "loss.itm_inputs='corrupted' ITM reads the CMAP pass throughout: "
          'set loss.itm_corrupted_warmup=0')
  if config.loss.get('mask_anchors', False) and config.cmap.enabled:
    _fail('loss.mask_anchors', True, 'MLM and MRC cannot mask the anchors '
          'CMAP swaps: set cmap.enabled=False or loss.mask_anchors=False')
  if config.loss.amc > 0 and not config.cmap.enabled:
    _fail('loss.amc', config.loss.amc,
          'AMC needs CMAP: set cmap.enabled=True or loss.amc=0')
  # The recipe's own fields (cmal_jax/recipes/); an unknown name fails.
  recipes.get(config.recipe).check(config)


# data fields only pre-training reads (tfds_source.py feeds pre-training
# pairs), with their defaults; tfds_features' default maps each field to its
# own name. Fine-tuning reads task files from data.dir.
PRETRAIN_ONLY_DATA = {'source': '', 'tfds_data_dir': '', 'read': 'global'}


def _validate_finetune_data(config):
  """Refuses pre-training's data options in a fine-tuning config, where
  nothing reads them."""
  d = config.data
  why = (f'only pre-training reads it; fine-tuning reads its task files '
         f'({config.task}_<split>.array_record) from data.dir')
  for field, default in PRETRAIN_ONLY_DATA.items():
    if d.get(field, default) != default:
      _fail(f'data.{field}', d[field], why)
  for field, path in (d.get('tfds_features') or {}).items():
    if path != field:
      _fail(f'data.tfds_features.{field}', path, why)


def _validate_finetune(config):
  _validate_finetune_data(config)
  f = config.finetune
  if not 0 <= config.data.itm_neg_prob <= 1:
    _fail('data.itm_neg_prob', config.data.itm_neg_prob,
          'must be a probability in [0, 1]')
  if not isinstance(f.num_answers, int) or f.num_answers <= 0:
    _fail('finetune.num_answers', f.num_answers, 'must be a positive integer')
  if f.itc < 0:
    _fail('finetune.itc', f.itc, 'must be >= 0')
  negatives = f.get('itm_negatives', 'random')
  if negatives not in ITM_NEGATIVES:
    _fail('finetune.itm_negatives', negatives,
          f'must be one of {ITM_NEGATIVES}')
  if negatives == 'hard' and config.data.itm_neg_prob != 0:
    _fail('finetune.itm_negatives', negatives,
          'mines its own negatives, so every row must be a matched pair: '
          f'set data.itm_neg_prob=0 (it is {config.data.itm_neg_prob})')
  if not f.pretrained_lr_mult > 0:
    _fail('finetune.pretrained_lr_mult', f.pretrained_lr_mult, 'must be > 0')
  if not isinstance(f.rerank_k, int) or f.rerank_k < 0:
    _fail('finetune.rerank_k', f.rerank_k, 'must be an integer >= 0')
  if f.rerank_score not in RERANK_SCORES:
    _fail('finetune.rerank_score', f.rerank_score,
          f'must be one of {RERANK_SCORES}')
  if isinstance(f.test_splits, str):
    _fail('finetune.test_splits', f.test_splits,
          "must be a tuple of split names, e.g. ('test',)")
  if not isinstance(config.init_step, int) or config.init_step < 0:
    _fail('init_step', config.init_step, 'must be an integer >= 0 (0: latest)')
  if config.init_step and not config.init_from:
    _fail('init_step', config.init_step,
          "picks a checkpoint of init_from, which is '': set init_from or "
          'init_step=0')
