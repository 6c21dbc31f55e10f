"""What a run is, so that only the same run resumes from a checkpoint.

Two records are saved with every checkpoint (checkpoint.py):
- the signature: the fields that shape the parameters (size, recipe, model).
  A checkpoint of another signature cannot be resumed at all.
- the identity: every config field that changes what the weights become
  (steps, schedule, seed, data, CMAP, losses, ...): all of the config but
  RESUME_FREE_FIELDS, plus under data.read='own_shards' the process count
  (READ_PROCESSES). A resume that changes one is refused, naming the
  fields, unless config.resume='allow_changes', which accepts the change and
  records it (train.py: run_info.json, and config.json's history).
"""

import json

import jax
from flax import traverse_util

# Config fields that define the run's parameters and objectives: a checkpoint
# made with other values is not resumed. Dropout and the activation dtype do
# not change the parameters, so they may differ.
SIGNATURE_FIELDS = ('size', 'recipe', 'model')
# Model fields a resumed run may change: they leave the function alone
# (dropout is training noise, dtype and remat trade precision or memory,
# two_stream picks SemVLP's mode over the same parameters).
FREE_MODEL_FIELDS = ('dropout', 'dtype', 'remat', 'two_stream')
# Signature fields added after checkpoints were written: a checkpoint that
# lacks one was made with this value (the behaviour before the field).
SIGNATURE_DEFAULTS = {'model.hypersphere': True,
                      'model.visual.input': 'regions',
                      'model.cross_attention': False,
                      'model.prototypes': 0,
                      'model.moved_place': 'carried',
                      'model.head_input': 'cls'}



def signature(config):
  """The config fields that shape the parameters, as plain JSON data."""
  sig = json.loads(json.dumps({k: config[k] for k in SIGNATURE_FIELDS},
                              default=lambda o: o.to_dict()))
  for k in FREE_MODEL_FIELDS:
    sig['model'].pop(k, None)
  visual = sig['model'].get('visual', {})
  if visual.get('input', 'regions') == 'pixels':
    # The backbone's width is the feature width; region_feat_dim is unused.
    sig['model'].pop('region_feat_dim', None)
  else:  # Region features: the backbone fields shape nothing.
    sig['model']['visual'] = {'input': 'regions'}
  if config.task != 'pretrain':  # The task head's shape.
    sig['task'] = config.task
    if config.task == 'vqa':
      sig['num_answers'] = config.finetune.num_answers
  return sig


def signature_mismatches(saved, current):
  """['model.hidden_dim: checkpoint 64, config 256', ...] (sorted)."""
  saved = {**SIGNATURE_DEFAULTS, **traverse_util.flatten_dict(saved, sep='.')}
  current = traverse_util.flatten_dict(current, sep='.')
  for k in FREE_MODEL_FIELDS:  # Older checkpoints kept some of them.
    saved.pop(f'model.{k}', None)
  return [f'{k}: checkpoint {saved.get(k)!r}, config {current.get(k)!r}'
          for k in sorted(set(saved) | set(current))
          if saved.get(k) != current.get(k)]


# ------------------------------------------------------------- the identity

# Fields a resumed run may change, written once: how the run is watched,
# saved, evaluated and laid out over devices, not what its weights become
# (a mesh, micro-batching or remat change the floating-point rounding only).
# Every other field is part of the run's identity. A section name frees the
# whole section.
RESUME_FREE_FIELDS = (
    'resume', 'stop_at_step', 'compile_only', 'compiler_options',
    'log_every', 'checkpoint_every', 'keep_checkpoints', 'max_nonfinite_steps',
    'debug_nan_steps',
    'eval', 'data.eval_split', 'finetune.test_splits', 'finetune.rerank_k',
    'finetune.rerank_score',
    'world.num_eval',
    'mesh', 'sharding', 'axis_rules', 'grad_accum_steps', 'model.remat',
    'data.num_threads', 'data.prefetch',
)
RESUME_MODES = ('auto', 'fresh', 'allow_changes')
# Identity fields added after checkpoints recorded an identity: a checkpoint
# that lacks one was made with this value (the behaviour before the field).
# The signature's defaults are the model's (the identity holds the model
# fields too). A field missing here and in the checkpoint counts as a change.
IDENTITY_DEFAULTS = {**SIGNATURE_DEFAULTS, 'data.read': 'global',
                     'finetune.itm_negatives': 'random',
                     'loss.mlm_modifier_prob': 0.0}
# Under data.read='own_shards' each process reads and batches its own
# shards, so the global batches (and the iterator positions saved) depend
# on the process count: identity() records it in this derived field, for
# such runs only, so a resume with another count is refused naming it.
READ_PROCESSES = 'data.read_processes'


def _is_free(field):
  return any(field == f or field.startswith(f + '.')
             for f in RESUME_FREE_FIELDS)


def identity(config, process_count=None):
  """{'field.path': value} for every identity field of `config` (JSON data;
  tuples as lists, as they come back from a checkpoint); under
  data.read='own_shards' also READ_PROCESSES, the process count
  (process_count, default jax.process_count())."""
  flat = traverse_util.flatten_dict(
      json.loads(config.to_json_best_effort()), sep='.')
  if flat.get('data.read') == 'own_shards':
    flat[READ_PROCESSES] = (jax.process_count() if process_count is None
                            else process_count)
  return {k: v for k, v in sorted(flat.items()) if not _is_free(k)}


def identity_changes(saved, current):
  """{'field': (saved value, current value)} for the identity fields that
  differ (a field only one of them has counts, as missing: None). A
  default of IDENTITY_DEFAULTS fills in only a field the current config
  has (a pre-training run has no finetune section)."""
  current = {k: v for k, v in current.items() if not _is_free(k)}
  defaults = {k: v for k, v in IDENTITY_DEFAULTS.items() if k in current}
  saved = {k: v for k, v in {**defaults, **saved}.items()
           if not _is_free(k)}
  return {k: (saved.get(k), current.get(k))
          for k in sorted(set(saved) | set(current))
          if saved.get(k) != current.get(k)}


def describe_changes(changes):
  """'total_steps: checkpoint 450, config 600; seed: ...'."""
  return '; '.join(f'{k}: checkpoint {old!r}, config {new!r}'
                   for k, (old, new) in changes.items())
