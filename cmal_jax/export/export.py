"""Export a trained model for PyTorch and Hugging Face.

    python -m cmal_jax.export --workdir=runs/pretrain [--step=N|best] --out=DIR

writes
  DIR/model.safetensors, DIR/config.json   the whole model for
      cmal_jax.export.torch_model.CMAL.from_pretrained(DIR)
  DIR/unified_bert/                        the unified encoder as a
      Hugging Face BERT folder (config.json, model.safetensors, vocab.txt)

Run our unified encoder through transformers on hybrid input embeddings
(x [B, T + R, D] from the mirror's `hybrid_embeddings`, mask [B, T + R]):

    bert = transformers.BertModel.from_pretrained('DIR/unified_bert')
    additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(
        torch.float32).min
    hidden = bert.encoder(x, attention_mask=additive).last_hidden_state

Writing needs numpy and safetensors only; torch is not imported. The export
is written to a temporary folder next to DIR and renamed into place, so a
failure never leaves a half-written DIR, and an existing one is replaced
only with --overwrite.
"""

import argparse
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from safetensors.numpy import save_file

from cmal_jax import checkpoint, cli_errors
from cmal_jax.data import task_pipeline, tokenizer
from cmal_jax.data.shapes import Shapes, zero_inputs
from cmal_jax.export import bert
from cmal_jax.model import torch_names
from cmal_jax.model.cmal import CMAL, PIXEL_PARAMS, ModelConfig
from cmal_jax.model.layers import EncoderConfig
from cmal_jax.world import synthetic

CONFIG_FILE, WEIGHTS_FILE, BERT_DIR = 'config.json', 'model.safetensors', \
    'unified_bert'
FORMAT = 'cmal_jax'


# ------------------------------------------------------- the model's config

def check_exportable(run_config, params=None):
  """Raises ValueError for a model the PyTorch mirror cannot describe: one
  that reads pixels (the mirror has no pixel backbone) or runs SemVLP's
  two-stream mode (no cross-attention sub-layer)."""
  if run_config.model.get('two_stream', False):
    raise ValueError(
        'export: this model runs two-stream (config.model.two_stream=True); '
        'the PyTorch mirror (cmal_jax/export/torch_model.py) has no '
        'cross-attention sub-layer. A single-stream model of the same '
        'checkpoint (fine-tuned with model.two_stream=False) exports.')
  visual = run_config.model.get('visual') or {}
  if visual.get('input', 'regions') == 'pixels' or (
      params is not None and PIXEL_PARAMS in params):
    raise ValueError(
        'export: this model reads pixels (config.model.visual.input='
        "'pixels'); the PyTorch mirror (cmal_jax/export/torch_model.py) "
        'has no pixel backbone, so an export would describe another model. '
        "Only models of region features (model.visual.input='regions') "
        'export.')


def drop_unused_cross_attention(params):
  """params without SemVLP's cross-attention sub-layers, which a
  single-stream model never runs (check_exportable refused two-stream
  ones): the exported model computes exactly what the checkpoint's does."""
  flat = traverse_util.flatten_dict(params, sep='/')
  return traverse_util.unflatten_dict(
      {k: v for k, v in flat.items()
       if not any(part in ('cross_attention', 'cross_attention_norm')
                  for part in k.split('/'))}, sep='/')


def export_config(run_config, params, source=None):
  """The exported config.json: the model sizes (the parameter shapes decide
  num_tags, num_outputs and the feature width), the task and the input
  limits of the run."""
  check_exportable(run_config, params)
  flat = traverse_util.flatten_dict(params, sep='/')
  m = run_config.model
  model = {f: m[f] for f in ('hidden_dim', 'num_heads', 'mlp_dim',
                             'text_layers', 'vision_layers', 'unified_layers',
                             'dropout', 'vocab_size', 'max_position',
                             'hypersphere')}
  # Runs from before model.moved_place moved the features it calls carried.
  model['moved_place'] = m.get('moved_place', 'carried')
  model['head_input'] = m.get('head_input', 'cls')
  model['region_feat_dim'] = int(flat['vision_encoder/feature/kernel'].shape[0])
  model['num_tags'] = int(flat['tag_head/classifier/kernel'].shape[-1]
                          if 'tag_head/classifier/kernel' in flat else 1)
  model['layer_norm_eps'] = EncoderConfig.layer_norm_eps
  num_outputs = int(flat['vqa_head/classifier/kernel'].shape[-1]
                    if 'vqa_head/classifier/kernel' in flat else 0)
  d = run_config.data
  return dict(format=FORMAT, task=run_config.task, num_outputs=num_outputs,
              model=model,
              inputs=dict(max_text_len=d.max_text_len,
                          max_regions=d.max_regions,
                          max_anchors=d.max_anchors),
              source=source or {})


def flax_model(config):
  """The JAX model an exported config describes."""
  m = config['model']
  fields = {k: m[k] for k in ('hidden_dim', 'num_heads', 'mlp_dim',
                              'text_layers', 'vision_layers', 'unified_layers',
                              'dropout', 'vocab_size', 'num_tags',
                              'max_position')}
  # Exports written before the hypersphere ablation existed had it on, and
  # before model.moved_place, CMAP moved the features it now calls carried.
  fields['hypersphere'] = m.get('hypersphere', True)
  fields['moved_place'] = m.get('moved_place', 'carried')
  fields['head_input'] = m.get('head_input', 'cls')
  return CMAL(ModelConfig(**fields), task=config['task'],
              num_outputs=config.get('num_outputs', 0))


def init_inputs(config, batch=1):
  """Zero inputs of the smallest shapes `flax_model(config)` takes (the
  anchors as the corruption hands them to the model)."""
  shapes = Shapes(max_text_len=2, max_regions=2, max_anchors=1,
                  feature_dim=config['model']['region_feat_dim'])
  rows = 2 * batch if config['task'] == 'nlvr2' else batch
  if config['task'] != 'pretrain':
    return zero_inputs(shapes, rows)
  inputs = zero_inputs(shapes, rows, pretrain=True)
  none = jnp.zeros_like(inputs['anchor_region'])  # [rows, K]
  return dict(inputs, anchor_action=none, mlm_positions=none)


def abstract_params(config):
  """The parameter tree of `flax_model(config)` as ShapeDtypeStructs."""
  model = flax_model(config)
  return jax.eval_shape(lambda: nn.unbox(model.init(
      jax.random.key(0), init_inputs(config)))['params'])


# ---------------------------------------------------------------- reading

def read_run_config(workdir, what='export'):
  """A training workdir's config.json. `what` starts the error message (the
  command that reads it)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'{what}: {workdir} has no config.json: not a training workdir (the '
        '--workdir of python -m cmal_jax.main).')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_params(workdir, step=None, what='export'):
  """(params, where) of checkpoint `step` (None: the latest; 'best': the
  best evaluated parameters in workdir/best). `what` starts the error
  messages."""
  if step != 'best':
    return checkpoint.load_pretrained_params(workdir, step, what=what)
  best_json = os.path.join(workdir, 'best.json')
  if not os.path.isfile(best_json):
    raise FileNotFoundError(f'{what} --step=best: {best_json} not found (the '
                            'run kept no best parameters).')
  with open(best_json) as f:
    best_step = json.load(f)['step']
  manager = ocp.CheckpointManager(checkpoint.best_dir(workdir),
                                  item_names=('params',))
  try:
    params = manager.restore(best_step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore()))['params']
  finally:
    manager.close()
  return params, f'{checkpoint.best_dir(workdir)}/{best_step}'


def answer_vocab(run_config, workdir):
  """The VQA run's answers (the head's output order), or None."""
  directory = synthetic.data_dir(run_config, workdir)
  path = os.path.join(directory, task_pipeline.ANSWER_VOCAB_FILE)
  if run_config.task != 'vqa' or not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)['answers']


def parse_step(step):
  """A --step value -> what load_params takes: 'best', None for 'latest'
  (or None), or the step number (int or digits)."""
  if step in ('best', None):
    return step
  if step == 'latest':
    return None
  if isinstance(step, int) or str(step).isdigit():
    return int(step)
  raise ValueError(f"--step={step}: a checkpoint step, 'best' or 'latest'")


def add_checkpoint_flags(parser, workdir_help, default_step):
  """--workdir and --step (parse_step) of a command that reads a training
  workdir's checkpoint."""
  parser.add_argument('--workdir', required=True, help=workdir_help)
  parser.add_argument(
      '--step', default=default_step,
      help="A checkpoint step N (workdir/checkpoints/N), 'latest' or 'best' "
      f'(workdir/best); default: {default_step}.')


# ---------------------------------------------------------------- writing

def trees_equal(a, b):
  """Same keys, dtypes and bitwise-equal values (nested trees)."""
  fa = traverse_util.flatten_dict(a, sep='/')
  fb = traverse_util.flatten_dict(b, sep='/')
  return fa.keys() == fb.keys() and all(
      np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype
      and np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])) for k in fa)


def check_out_dir(out, overwrite):
  if (os.path.exists(out) and not overwrite
      and (not os.path.isdir(out) or os.listdir(out))):
    raise FileExistsError(
        f'export: {out} exists and is not empty; pass --overwrite to replace '
        'it (the old export stays until the new one is complete).')


def write_json(path, obj):
  with open(path, 'w') as f:
    json.dump(obj, f, indent=2)


def write_export(out, params, config, vocab_path=None, overwrite=False):
  """Writes the export of `params` (nested, host) described by `config`
  (export_config) into `out`, atomically."""
  check_out_dir(out, overwrite)
  params = jax.tree.map(np.asarray, params)
  state = torch_names.to_torch_state(params)
  # The export must read back to the very same parameters.
  if not trees_equal(torch_names.from_torch_state(state, params), params):
    raise AssertionError('export: the name mapping does not round-trip.')
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f'.{os.path.basename(out)}.tmp-{os.getpid()}')
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    os.makedirs(os.path.join(tmp, BERT_DIR))
    save_file(state, os.path.join(tmp, WEIGHTS_FILE),
              metadata={'format': 'pt'})
    write_json(os.path.join(tmp, CONFIG_FILE), config)
    save_file(bert.unified_bert_state(state),
              os.path.join(tmp, BERT_DIR, WEIGHTS_FILE),
              metadata={'format': 'pt'})
    write_json(os.path.join(tmp, BERT_DIR, CONFIG_FILE),
               bert.bert_config(config['model']))
    if vocab_path:
      shutil.copy(vocab_path, os.path.join(tmp, BERT_DIR, 'vocab.txt'))
    replace_dir(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def replace_dir(new, out):
  """Moves the complete folder `new` to `out`; an old `out` is moved aside
  first and deleted only once `new` is in place."""
  old = None
  if os.path.exists(out):
    old = f'{out}.old-{os.getpid()}'
    os.rename(out, old)
  try:
    os.rename(new, out)
  except BaseException:
    if old:
      os.rename(old, out)
    raise
  if old:
    shutil.rmtree(old)


def export(workdir, out, step=None, overwrite=False):
  """Exports checkpoint `step` (None: latest; 'best') of `workdir` to `out`.
  Returns the written config."""
  check_out_dir(out, overwrite)  # Before the (slow) checkpoint read.
  run_config = read_run_config(workdir)
  check_exportable(run_config)
  params, where = load_params(workdir, step)
  params = drop_unused_cross_attention(params)
  config = export_config(run_config, params,
                         source=dict(workdir=os.path.abspath(workdir),
                                     checkpoint=where))
  answers = answer_vocab(run_config, workdir)
  if answers is not None:
    config['answers'] = answers
  template = abstract_params(config)
  torch_names.from_torch_state(  # Fails naming what a changed model lacks.
      torch_names.to_torch_state(params), template, f'checkpoint {where}')
  vocab = run_config.data.get('vocab_path') or tokenizer.default_vocab_path()
  write_export(out, params, config, vocab, overwrite)
  return config


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog='python -m cmal_jax.export',
      description='Exports a trained model to PyTorch (safetensors + '
      'config.json) and its unified encoder to a Hugging Face BERT folder.')
  add_checkpoint_flags(parser, 'A training workdir (python -m '
                       'cmal_jax.main).', default_step='latest')
  parser.add_argument('--out', required=True, help='The export folder.')
  parser.add_argument('--overwrite', action='store_true',
                      help='Replace an existing, non-empty --out.')
  cli_errors.add_verbose_flag(parser)
  args = parser.parse_args(argv)
  try:
    step = parse_step(args.step)
  except ValueError as e:
    parser.error(str(e))
  config = export(args.workdir, args.out, step, args.overwrite)
  print(f"Exported {config['task']} model ({config['source']['checkpoint']})"
        f' to {args.out}: {WEIGHTS_FILE}, {CONFIG_FILE}, {BERT_DIR}/.')
