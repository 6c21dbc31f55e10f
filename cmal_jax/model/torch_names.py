"""The one name-and-layout table between our JAX parameters, the PyTorch
mirror (`torch_model.py`) and Hugging Face BERT. Both directions (export
and import) go through it; it needs numpy only, no torch.

JAX (flat, '/'-joined)                    PyTorch mirror
  .../layer_3/...                     <->   .../layer.3...
  layer_i/attention/query_kernel      <->   layer.i.attention.self.query.weight
    [D, heads, head_dim]                      [heads * head_dim, D]
  layer_i/attention/query_bias        <->   ...query.bias  [heads * head_dim]
  layer_i/attention/out_kernel        <->   layer.i.attention.output.dense.weight
    [heads, head_dim, D]                      [D, heads * head_dim]
  layer_i/attention_norm              <->   layer.i.attention.output.LayerNorm
  layer_i/intermediate                <->   layer.i.intermediate.dense
  layer_i/output                      <->   layer.i.output.dense
  layer_i/output_norm                 <->   layer.i.output.LayerNorm
  Dense kernel [in, out]              <->   Linear weight [out, in]
  LayerNorm scale, Embed embedding    <->   weight
  anything else (bias, text_scale...) <->   the same name, the same array

The mirror's own module names are the JAX ones, so only a Transformer
layer's inside is renamed; it is named as Hugging Face's `BertLayer`, which
makes the unified encoder a BERT encoder (`BERT_NAMES`).
"""

import re

import numpy as np
from flax import traverse_util

# Module renames directly under a Transformer layer.
LAYER_MODULES = {
    'attention_norm': 'attention.output.LayerNorm',
    'intermediate': 'intermediate.dense',
    'output': 'output.dense',
    'output_norm': 'output.LayerNorm',
}
# Attention leaves: JAX name -> (PyTorch suffix, layout).
ATTENTION_LEAVES = {
    **{f'{p}_kernel': (f'self.{p}.weight', 'heads_in')
       for p in ('query', 'key', 'value')},
    **{f'{p}_bias': (f'self.{p}.bias', 'heads_bias')
       for p in ('query', 'key', 'value')},
    'out_kernel': ('output.dense.weight', 'heads_out'),
    'out_bias': ('output.dense.bias', 'same'),
}
# Every other leaf: JAX name -> (PyTorch name, layout).
LEAVES = {'kernel': ('weight', 'dense'), 'scale': ('weight', 'same'),
          'embedding': ('weight', 'same')}

# Layouts: JAX array -> PyTorch array, and back given the JAX shape.
TO_TORCH = {
    'same': lambda x: x,
    'dense': lambda x: x.T,
    'heads_in': lambda x: x.reshape(x.shape[0], -1).T,
    'heads_bias': lambda x: x.reshape(-1),
    'heads_out': lambda x: x.reshape(-1, x.shape[-1]).T,
}
FROM_TORCH = {
    'same': lambda x, shape: x,
    'dense': lambda x, shape: x.T,
    'heads_in': lambda x, shape: x.T.reshape(shape),
    'heads_bias': lambda x, shape: x.reshape(shape),
    'heads_out': lambda x, shape: x.T.reshape(shape),
}
_LAYER = re.compile(r'layer_(\d+)$')

# Our PyTorch-mirror names <-> a Hugging Face `BertModel`'s: the unified
# encoder with the embeddings it sees (slot positions, token types, their
# LayerNorm), the text UMSE's word table and the ITM head's BERT pooler.
BERT_NAMES = (
    ('unified.', 'encoder.'),
    ('slots.position_embeddings.', 'embeddings.position_embeddings.'),
    ('slots.token_type_embeddings.', 'embeddings.token_type_embeddings.'),
    ('slots.LayerNorm.', 'embeddings.LayerNorm.'),
    ('text_encoder.word_embeddings.', 'embeddings.word_embeddings.'),
    ('itm_head.pooler.', 'pooler.dense.'),
)
# Import only: the text UMSE's own position table and embedding LayerNorm
# start from BERT's too (its input stage is BERT's embedding stage).
BERT_IMPORT_ALSO = (
    ('text_encoder.position_embeddings.', 'embeddings.position_embeddings.'),
    ('text_encoder.LayerNorm.', 'embeddings.LayerNorm.'),
)


def torch_name(jax_name):
  """'unified/layer_0/attention/query_kernel' ->
  ('unified.layer.0.attention.self.query.weight', 'heads_in')."""
  parts = jax_name.split('/')
  out = []
  for i, part in enumerate(parts[:-1]):
    m = _LAYER.match(part)
    if m:
      out.append(f'layer.{m.group(1)}')
    elif i > 0 and _LAYER.match(parts[i - 1]) and part in LAYER_MODULES:
      out.append(LAYER_MODULES[part])
    else:
      out.append(part)
  leaf = parts[-1]
  if len(parts) > 2 and parts[-2] == 'attention' and _LAYER.match(parts[-3]):
    suffix, layout = ATTENTION_LEAVES[leaf]
    out[-1:] = [f'attention.{suffix}']
  else:
    suffix, layout = LEAVES.get(leaf, (leaf, 'same'))
    out.append(suffix)
  return '.'.join(out), layout


def to_torch_state(params):
  """JAX params (nested) -> {PyTorch name: C-contiguous numpy array}."""
  state = {}
  for key, value in traverse_util.flatten_dict(params, sep='/').items():
    name, layout = torch_name(key)
    state[name] = np.array(TO_TORCH[layout](np.asarray(value)), order='C')
  return state


def from_torch_state(state, template, source='the state dict',
                     allow_missing=False, allow_unexpected=False):
  """{PyTorch name: array} -> JAX params shaped like `template` (nested; of
  arrays or ShapeDtypeStructs).

  Raises ValueError naming every missing key, unexpected key and shape
  mismatch (with both shapes). allow_missing: leaves `state` lacks are left
  out of the result; allow_unexpected: extra keys in `state` are ignored.
  """
  flat = traverse_util.flatten_dict(template, sep='/')
  out, missing, bad_shape, used = {}, [], [], set()
  for key, want in flat.items():
    name, layout = torch_name(key)
    if name not in state:
      missing.append(name)
      continue
    used.add(name)
    x = np.asarray(state[name])
    expected = TO_TORCH[layout](np.zeros(want.shape, np.int8)).shape
    if tuple(x.shape) != tuple(expected):
      bad_shape.append(f'{name}: {source} {tuple(x.shape)}, model '
                       f'{tuple(expected)}')
      continue
    out[key] = FROM_TORCH[layout](x, tuple(want.shape)).astype(want.dtype)
  unexpected = [] if allow_unexpected else sorted(set(state) - used)
  problems = bad_shape + (
      [] if allow_missing else [f'{n}: missing in {source}' for n in missing])
  problems += [f'{n}: unexpected in {source} (not a parameter of this model)'
               for n in unexpected]
  if problems:
    raise ValueError(
        f'{source} does not fit the model ({len(problems)} problem(s)): '
        + '; '.join(problems[:8]) + ('; ...' if len(problems) > 8 else ''))
  return traverse_util.unflatten_dict(out, sep='/')


def rename_prefixes(state, table, reverse=False):
  """Renames keys by (ours, theirs) prefix pairs (reverse: theirs -> ours;
  one of theirs may feed several of ours). Keys no pair matches are
  dropped."""
  out = {}
  for ours, theirs in table:
    src, dst = (theirs, ours) if reverse else (ours, theirs)
    for key, value in state.items():
      if key.startswith(src):
        out[dst + key[len(src):]] = value
  return out
