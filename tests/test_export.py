"""Interop (cmal_jax/export): the PyTorch mirror against the JAX model on
every head, the JAX -> PyTorch -> JAX round trip, the unified encoder
against transformers.BertModel, --config.init.bert from the shipped
MiniLM checkpoint, and the export CLI's bad-input errors.

The fine-tuned VQA model's answers in PyTorch are checked in
test_finetune.py, next to the VQA run they reuse.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from cmal_jax import jobs
from cmal_jax.export import export, torch_model
from cmal_jax.model import bert_init, torch_names
from cmal_jax.model import cmap
from configs import pretrain as pretrain_config
from cmal_testutil import SHARED_STEPS, fast_step

TASKS = ('pretrain', 'vqa', 've', 'nlvr2', 'rec', 'retrieval')
# Two sizes; the second has an unusual head count (5 heads of 12), an MLP
# that is not 4 D and odd vocabulary, tag and feature sizes, and its VQA,
# VE and NLVR2 heads read the region slots beside [CLS].
SIZES = {
    'd64h2': dict(hidden_dim=64, num_heads=2, mlp_dim=256, text_layers=1,
                  vision_layers=1, unified_layers=2, vocab_size=300,
                  num_tags=10, region_feat_dim=64, max_position=64),
    'd60h5': dict(hidden_dim=60, num_heads=5, mlp_dim=96, text_layers=2,
                  vision_layers=1, unified_layers=3, vocab_size=211,
                  num_tags=7, region_feat_dim=33, max_position=40,
                  head_input='cls_and_regions'),
}
MINILM = bert_init.resolve_path('minilm')


def export_config(size, task, num_outputs=7):
  model = dict(SIZES[size], dropout=0.1, layer_norm_eps=1e-12)
  return dict(format=export.FORMAT, task=task,
              num_outputs=num_outputs if task == 'vqa' else 0, model=model)


def random_params(config, seed=0):
  """Random values in the model's parameter shapes (no init needed): std
  0.1 around 0, and around 1 for the LayerNorm and modality scales, so no
  layer is near identity."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(export.abstract_params(config), sep='/')
  return traverse_util.unflatten_dict({
      k: (rng.normal(0, 0.1, s.shape) + k.endswith('scale')).astype(s.dtype)
      for k, s in flat.items()}, sep='/')


def random_inputs(config, batch=3, T=12, R=6, K=3, M=4, seed=0):
  """Inputs with padding on both sides and (pretrain) anchors under every
  CMAP action, swaps and masks included."""
  rng = np.random.default_rng(seed)
  m = config['model']
  rows = 2 * batch if config['task'] == 'nlvr2' else batch
  text_len = rng.integers(K + 3, T + 1, rows)
  num_regions = rng.integers(K, R + 1, rows)
  text_mask = (np.arange(T)[None] < text_len[:, None]).astype(np.int32)
  region_mask = (np.arange(R)[None] < num_regions[:, None]).astype(np.int32)
  xy = rng.uniform(0, 0.5, (rows, R, 2))
  inputs = dict(
      input_ids=(rng.integers(0, m['vocab_size'], (rows, T))
                 * text_mask).astype(np.int32),
      text_mask=text_mask,
      region_feats=rng.normal(0, 1, (rows, R, m['region_feat_dim'])).astype(
          np.float32),
      region_boxes=np.concatenate(
          [xy, xy + rng.uniform(0.1, 0.5, (rows, R, 2))], -1).astype(
              np.float32),
      region_mask=region_mask)
  if config['task'] == 'pretrain':
    pos = np.stack([np.sort(rng.choice(np.arange(1, n - 2), K, replace=False))
                    for n in text_len])
    inputs.update(
        anchor_text_pos=pos.astype(np.int32),
        # Some anchors span two pieces, so the other-pieces mask is used.
        anchor_text_end=(pos + 1 + (np.arange(K) % 2)).astype(np.int32),
        anchor_region=np.stack([rng.choice(n, K, replace=False)
                                for n in num_regions]).astype(np.int32),
        anchor_action=np.resize(np.array(
            [cmap.SWAP, cmap.MASK, cmap.SWAP, cmap.KEEP,
             cmap.NONE], np.int32), (rows, K)),
        mlm_positions=rng.integers(1, 4, (rows, M)).astype(np.int32))
  return inputs


def torch_outputs(config, params, inputs):
  model = torch_model.CMAL(config).eval()
  state = torch_names.to_torch_state(params)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
  with torch.no_grad():
    out = model({k: torch.from_numpy(v) for k, v in inputs.items()})
  return {k: v.detach().numpy() for k, v in out.items()}


@pytest.mark.parametrize('size', sorted(SIZES))
@pytest.mark.parametrize('task', TASKS)
def test_torch_mirror_matches_jax_on_every_head(size, task):
  config = export_config(size, task)
  params = random_params(config)
  inputs = random_inputs(config)
  if task == 'pretrain':  # Every action occurs, with real swaps.
    assert {cmap.SWAP, cmap.MASK, cmap.KEEP, cmap.NONE} <= set(
        inputs['anchor_action'].ravel())
  want = jax.device_get(export.flax_model(config).apply(
      {'params': params}, jax.tree.map(jnp.asarray, inputs)))
  got = torch_outputs(config, params, inputs)
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].shape == np.shape(want[k]), k
    np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-5,
                               err_msg=f'{size} {task} {k}')
  if task == 'pretrain':
    # The swap moved features: the outputs differ from an unswapped pass.
    plain = dict(inputs, anchor_action=np.zeros_like(inputs['anchor_action']))
    assert not np.allclose(torch_outputs(config, params, plain)['itm_logits'],
                           got['itm_logits'], atol=1e-4)


def test_a_single_stream_semvlp_model_exports_exactly():
  """SemVLP's cross-attention sub-layers are dropped from the export of a
  single-stream model (which never runs them): the mirror computes what
  the model with them computes. A two-stream model is refused."""
  import ml_collections
  from cmal_jax.model.cmal import CMAL, ModelConfig
  config = export_config('d64h2', 've')
  m = config['model']
  fields = {k: m[k] for k in ('hidden_dim', 'num_heads', 'mlp_dim',
                              'text_layers', 'vision_layers',
                              'unified_layers', 'dropout', 'vocab_size',
                              'num_tags', 'max_position')}
  semvlp = CMAL(ModelConfig(**fields, cross_attention=True), task='ve')
  inputs = jax.tree.map(jnp.asarray, random_inputs(config))
  params = nn.unbox(semvlp.init(jax.random.key(3), inputs)['params'])
  assert 'cross_attention' in params['unified']['layer_0']
  kept = export.drop_unused_cross_attention(params)
  assert 'cross_attention' not in kept['unified']['layer_0']
  assert 'cross_attention_norm' not in kept['unified']['layer_0']
  want = semvlp.apply({'params': params}, inputs)['logits']
  got = torch_outputs(config, kept, {k: np.array(v) for k, v in
                                     inputs.items()})['logits']
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  two = ml_collections.ConfigDict({'model': {'two_stream': True}})
  with pytest.raises(ValueError, match='runs two-stream.*no cross-attention'):
    export.check_exportable(two)


@pytest.mark.parametrize('task', ('pretrain', 'retrieval'))
def test_hypersphere_ablation_is_mirrored_in_torch(task):
  """model.hypersphere=False: UMSE features leave unnormalised, the modality
  scales start at 1, ITC still reads unit vectors; torch agrees."""
  outputs, embeddings = {}, {}
  for unit in (True, False):
    config = export_config('d64h2', task)
    config['model']['hypersphere'] = unit
    params = random_params(config)
    inputs = random_inputs(config)
    model = export.flax_model(config)
    outputs[unit] = jax.device_get(model.apply(
        {'params': params}, jax.tree.map(jnp.asarray, inputs)))
    embeddings[unit] = np.asarray(model.apply(
        {'params': params}, inputs, method='embed_text'))
    got = torch_outputs(config, params, inputs)
    for k in outputs[unit]:
      np.testing.assert_allclose(got[k], outputs[unit][k], rtol=0, atol=1e-5,
                                 err_msg=f'hypersphere={unit} {k}')
    for k in ('itc_text', 'itc_image'):
      np.testing.assert_allclose(np.linalg.norm(outputs[unit][k], axis=-1),
                                 1.0, atol=1e-5)
    init = model.init(jax.random.key(0), export.init_inputs(config))
    assert float(nn.unbox(init)['params']['text_scale']) == (
        8.0 if unit else 1.0)
  norms = {u: np.linalg.norm(e, axis=-1) for u, e in embeddings.items()}
  np.testing.assert_allclose(norms[True], 1.0, atol=1e-5)
  assert np.all(np.abs(norms[False] - 1.0) > 0.1), norms[False]
  # The same parameters, another model: every output moves.
  key = 'itm_logits' if task == 'pretrain' else 'logits'
  assert not np.allclose(outputs[True][key], outputs[False][key], atol=1e-3)


def test_torch_swap_matches_jax_swap():
  config = export_config('d60h5', 'pretrain')
  inputs = random_inputs(config, seed=3)
  rng = np.random.default_rng(0)
  text = rng.normal(size=(3, 12, 8)).astype(np.float32)
  regions = rng.normal(size=(3, 6, 8)).astype(np.float32)
  mask_vector = rng.normal(size=(8,)).astype(np.float32)
  keys = ('anchor_text_pos', 'anchor_text_end', 'anchor_region',
          'anchor_action')
  want = cmap.swap_anchor_features(text, regions,
                                     *(inputs[k] for k in keys), mask_vector)
  got = torch_model.swap_anchor_features(
      torch.from_numpy(text), torch.from_numpy(regions),
      *(torch.from_numpy(inputs[k]) for k in keys),
      torch.from_numpy(mask_vector))
  for w, g in zip(want, got):
    np.testing.assert_array_equal(g.numpy(), np.asarray(w))
  # A swapped word's slot holds its region's feature.
  b, k = 0, 0
  assert inputs['anchor_action'][b, k] == cmap.SWAP
  np.testing.assert_array_equal(
      got[0][b, inputs['anchor_text_pos'][b, k]].numpy(),
      regions[b, inputs['anchor_region'][b, k]])


def test_torch_mirror_loads_and_runs_without_jax(tmp_path):
  """A PyTorch-only deployment: with jax and flax unimportable, the mirror
  still loads an export and gives the JAX model's outputs."""
  config = export_config('d64h2', 've')
  params = random_params(config)
  inputs = random_inputs(config)
  out = str(tmp_path / 'export')
  export.write_export(out, params, config)
  np.savez(str(tmp_path / 'inputs.npz'), **inputs)
  script = f"""
import sys
sys.modules['jax'] = sys.modules['flax'] = None  # Any import fails.
import numpy as np, torch
from cmal_jax.export.torch_model import CMAL
model = CMAL.from_pretrained({out!r})
inputs = dict(np.load({str(tmp_path / 'inputs.npz')!r}))
with torch.no_grad():
  logits = model({{k: torch.from_numpy(v) for k, v in inputs.items()}})
np.save({str(tmp_path / 'logits.npy')!r}, logits['logits'].numpy())
"""
  r = subprocess.run([sys.executable, '-c', script], capture_output=True,
                     text=True)
  assert r.returncode == 0, r.stderr
  want = export.flax_model(config).apply({'params': params}, inputs)
  np.testing.assert_allclose(np.load(tmp_path / 'logits.npy'),
                             want['logits'], atol=1e-5, rtol=0)


def test_torch_mirror_numbers_anchor_actions_as_jax():
  assert (torch_model.NONE, torch_model.SWAP, torch_model.MASK,
          torch_model.KEEP) == (cmap.NONE, cmap.SWAP, cmap.MASK,
                                cmap.KEEP)


def test_names_follow_the_table():
  assert torch_names.torch_name('unified/layer_3/attention/query_kernel') == (
      'unified.layer.3.attention.self.query.weight', 'heads_in')
  assert torch_names.torch_name('unified/layer_0/attention/out_kernel') == (
      'unified.layer.0.attention.output.dense.weight', 'heads_out')
  assert torch_names.torch_name('text_encoder/encoder/layer_1/output_norm/scale') \
      == ('text_encoder.encoder.layer.1.output.LayerNorm.weight', 'same')
  assert torch_names.torch_name('unified/layer_0/output/kernel') == (
      'unified.layer.0.output.dense.weight', 'dense')
  assert torch_names.torch_name('slots/position_embeddings/embedding') == (
      'slots.position_embeddings.weight', 'same')
  assert torch_names.torch_name('text_scale') == ('text_scale', 'same')
  # Every name of the mirror comes from the table, and none is left over.
  for task in TASKS:
    config = export_config('d60h5', task)
    names = set(torch_names.to_torch_state(random_params(config)))
    assert names == set(torch_model.CMAL(config).state_dict()), task
  # A head that reads the regions has weights a [CLS]-only one refuses.
  regions = export_config('d60h5', 'nlvr2')
  assert regions['model']['head_input'] == 'cls_and_regions'
  cls_only = dict(regions, model=dict(regions['model'], head_input='cls'))
  # [CLS] and the pooled regions of two images: 4 D inputs, not 2 D.
  with pytest.raises(ValueError, match=r'nlvr2_head\.dense\.weight: the '
                     r'state dict \(120, 240\), model \(120, 120\); '
                     r'nlvr2_head\.region_score\.bias: unexpected'):
    torch_names.from_torch_state(
        torch_names.to_torch_state(random_params(regions)),
        export.abstract_params(cls_only))


@pytest.mark.parametrize('size', sorted(SIZES))
def test_round_trip_through_safetensors_is_bitwise(size, tmp_path):
  config = export_config(size, 'pretrain')
  params = random_params(config, seed=1)
  out = str(tmp_path / 'export')
  export.write_export(out, params, config)
  # PyTorch loads it, and its parameters come back to JAX unchanged.
  model = torch_model.CMAL.from_pretrained(out)
  back = model.jax_params()
  flat, flat_back = (traverse_util.flatten_dict(t, sep='/')
                     for t in (params, back))
  assert flat.keys() == flat_back.keys()
  for k, v in flat.items():
    assert flat_back[k].dtype == v.dtype and flat_back[k].shape == v.shape, k
    assert np.array_equal(flat_back[k], v), k
  # The attention kernels really change layout: [D, H, K] -> [H * K, D].
  q = model.state_dict()['unified.layer.0.attention.self.query.weight']
  D, H = config['model']['hidden_dim'], config['model']['num_heads']
  np.testing.assert_array_equal(
      q.numpy(), flat['unified/layer_0/attention/query_kernel'].reshape(
          D, D).T)
  assert H * (D // H) == q.shape[0]


def hf_bert(folder, **kwargs):
  import transformers
  model, info = transformers.BertModel.from_pretrained(
      folder, output_loading_info=True, attn_implementation='eager', **kwargs)
  return model.eval(), info


def test_unified_bert_folder_loads_into_transformers(tmp_path):
  config = export_config('d60h5', 'pretrain')
  params = random_params(config, seed=2)
  out = str(tmp_path / 'export')
  export.write_export(out, params, config)
  model, info = hf_bert(os.path.join(out, export.BERT_DIR))
  assert not info['missing_keys'] and not info['unexpected_keys']
  assert not info['mismatched_keys']
  # A task model has no ITM pooler: its folder loads without a pooler.
  ve = export_config('d60h5', 've')
  export.write_export(str(tmp_path / 've'), random_params(ve), ve)
  _, ve_info = hf_bert(str(tmp_path / 've' / export.BERT_DIR),
                       add_pooling_layer=False)
  assert not ve_info['missing_keys'] and not ve_info['unexpected_keys']
  # The documented snippet: our hybrid embeddings through BertModel.encoder.
  inputs = random_inputs(config, seed=4)
  mirror = torch_model.CMAL.from_pretrained(out)
  t = {k: torch.from_numpy(v) for k, v in inputs.items()}
  with torch.no_grad():
    x = mirror.hybrid_embeddings(mirror.embed_text(t), mirror.embed_regions(t),
                                 t)
    mask = torch.cat([t['text_mask'], t['region_mask']], 1)
    additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(
        torch.float32).min
    hidden = model.encoder(x, attention_mask=additive).last_hidden_state
    ours = mirror.unified(x, mask)
  np.testing.assert_allclose(hidden.numpy(), ours.numpy(), atol=1e-5, rtol=0)


def minilm_model_config():
  c = pretrain_config.get_config('minilm')
  return {k: c.model[k] for k in ('hidden_dim', 'num_heads', 'mlp_dim',
                                  'unified_layers', 'vocab_size',
                                  'max_position')}


@pytest.fixture(scope='module')
def minilm_params():
  """The `minilm` preset's pre-training parameters (shapes from
  eval_shape, zeros), initialised from the shipped MiniLM checkpoint."""
  c = pretrain_config.get_config('minilm')
  config = dict(format=export.FORMAT, task='pretrain', num_outputs=0,
                model=dict(minilm_model_config(), text_layers=1,
                           vision_layers=1, dropout=0.0, num_tags=5,
                           region_feat_dim=c.model.region_feat_dim,
                           layer_norm_eps=1e-12))
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                       export.abstract_params(config))
  params, taken = bert_init.init_params(zeros, 'minilm', c.model)
  return config, params, taken


def test_init_from_minilm_takes_every_encoder_array(minilm_params):
  config, params, taken = minilm_params
  st = load_file(os.path.join(MINILM, 'model.safetensors'))
  flat = traverse_util.flatten_dict(params, sep='/')
  # 6 layers x 16 arrays, 5 embedding arrays into the slots + 1 word table,
  # 3 into the text UMSE, the pooler's 2.
  assert taken == 6 * 16 + 4 + 1 + 3 + 2
  np.testing.assert_array_equal(
      flat['text_encoder/word_embeddings/embedding'],
      st['embeddings.word_embeddings.weight'])
  np.testing.assert_array_equal(
      flat['unified/layer_5/attention/query_kernel'],
      st['encoder.layer.5.attention.self.query.weight'].T.reshape(384, 12, 32))
  np.testing.assert_array_equal(flat['itm_head/pooler/kernel'],
                                st['pooler.dense.weight'].T)
  # What BERT has no counterpart for keeps its init (zeros here).
  assert not flat['vision_encoder/feature/kernel'].any()
  assert not flat['slots/location/kernel'].any()


def test_unified_encoder_from_minilm_matches_transformers(minilm_params):
  """Input embeddings are BERT's own for random tokens (post-LayerNorm, as
  our slot embeddings are). On N(0, 1) inputs float32 rounding over the 6
  layers reaches 1e-5 for both libraries alike."""
  config, params, _ = minilm_params
  model, _ = hf_bert(MINILM)
  rng = np.random.default_rng(0)
  mask = np.ones((2, 14), np.int32)
  mask[1, 9:] = 0
  with torch.no_grad():
    x = model.embeddings(input_ids=torch.from_numpy(
        rng.integers(1000, 30000, (2, 14)))).numpy()
  from cmal_jax.model.layers import BertEncoder, EncoderConfig
  enc = BertEncoder(EncoderConfig(384, 12, 1536, 6, dropout=0.0))
  ours = enc.apply({'params': params['unified']}, jnp.asarray(x),
                   jnp.asarray(mask), True)
  additive = (1.0 - torch.from_numpy(mask)[:, None, None, :].float()) * \
      torch.finfo(torch.float32).min
  with torch.no_grad():
    theirs = model.encoder(torch.from_numpy(x),
                           attention_mask=additive).last_hidden_state
  np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-5,
                             rtol=0)


def test_pretraining_starts_from_init_bert(world_dir, compilation_cache,
                                           tmp_path):
  """--config.init.bert end to end: a tiny BERT folder (the unified encoder
  of a random tiny model, exported) initialises a tiny pre-training run.
  Its step-1 checkpoint holds the initial parameters (warmup: the first
  update has lr 0)."""
  from cmal_jax import checkpoint
  c = pretrain_config.get_config('tiny')
  m = c.model
  config = dict(format=export.FORMAT, task='pretrain', num_outputs=0,
                model=dict({k: m[k] for k in (
                    'hidden_dim', 'num_heads', 'mlp_dim', 'text_layers',
                    'vision_layers', 'unified_layers', 'vocab_size',
                    'max_position', 'region_feat_dim', 'dropout')},
                           num_tags=3, layer_norm_eps=1e-12))
  source = random_params(config, seed=7)
  export.write_export(str(tmp_path / 'export'), source, config)
  c.data.dir = world_dir
  c.init.bert = str(tmp_path / 'export' / export.BERT_DIR)
  # cmal_testutil.shared_tiny's settings: the compiled step is shared.
  c.total_steps, c.stop_at_step, c.eval.retrieval_images = SHARED_STEPS, 1, 8
  fast_step(c)
  assert jobs.train_and_evaluate(c, str(tmp_path / 'run')) is None
  params, _ = checkpoint.load_pretrained_params(str(tmp_path / 'run'))
  got = traverse_util.flatten_dict(params, sep='/')
  want = traverse_util.flatten_dict(source, sep='/')
  # BERT's embedding stage feeds both the slot embeddings and the text
  # UMSE's; the export wrote it from the slots'.
  also = {'text_encoder/position_embeddings/': 'slots/position_embeddings/',
          'text_encoder/LayerNorm/': 'slots/LayerNorm/'}
  expected = {k: want[k] for k in want if k.startswith(
      ('unified/', 'slots/position_embeddings', 'slots/token_type',
       'slots/LayerNorm', 'text_encoder/word_embeddings', 'itm_head/pooler'))}
  for ours, exported in also.items():
    expected.update({ours + k[len(exported):]: v for k, v in want.items()
                     if k.startswith(exported)})
  assert len(expected) == 2 * 16 + 4 + 1 + 3 + 2
  for k, v in expected.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  # The rest is the run's own random init.
  for k in ('vision_encoder/feature/kernel', 'text_encoder/sphere/kernel',
            'slots/location/kernel'):
    assert not np.allclose(got[k], want[k]), k


@pytest.mark.parametrize('arg', ['pretrain.py:minilm', 'pretrain.py:minilm,cmcl',
                                 'finetune.py:vqa,minilm'])
def test_minilm_presets_fit_the_shipped_checkpoint(arg):
  """The presets validate, which reads MiniLM's config.json and compares
  every size (check_config)."""
  from cmal_jax import configlib
  from configs import finetune as finetune_config
  module, _, preset = arg.partition(':')
  c = (pretrain_config if module == 'pretrain.py'
       else finetune_config).get_config(preset)
  assert c.init.bert == 'minilm'
  configlib.validate(c)
  c.model.num_heads = 6  # Same shapes, other heads: still refused.
  with pytest.raises(ValueError, match='num_attention_heads 12, '
                     'config.model.num_heads 6'):
    configlib.validate(c)


def test_init_bert_of_another_size_fails_at_start(tmp_path):
  c = pretrain_config.get_config('tiny')
  c.init.bert = 'minilm'
  with pytest.raises(ValueError, match='hidden_size 384, config.model.'
                     'hidden_dim 64; num_attention_heads 12, config.model.'
                     'num_heads 2'):
    jobs.train_and_evaluate(c, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'data')  # Nothing generated.


# ------------------------------------------------------------- bad input

def copy_bert(tmp_path, edit_config=None, drop=None):
  folder = tmp_path / 'bert'
  folder.mkdir()
  with open(os.path.join(MINILM, 'config.json')) as f:
    cfg = json.load(f)
  if edit_config:
    cfg.update(edit_config)
  (folder / 'config.json').write_text(json.dumps(cfg))
  st = load_file(os.path.join(MINILM, 'model.safetensors'))
  if drop:
    st = {k: v for k, v in st.items() if not k.startswith(drop)}
  save_file(st, str(folder / 'model.safetensors'))
  return str(folder)


@pytest.mark.parametrize('edit, message', [
    (dict(hidden_size=256), 'hidden_size 256, config.model.hidden_dim 384'),
    (dict(vocab_size=28996), 'vocab_size 28996, config.model.vocab_size 30522'),
    (dict(num_attention_heads=6), 'num_attention_heads 6, config.model.'
     'num_heads 12'),
])
def test_bert_folder_of_another_size_is_refused(tmp_path, edit, message):
  c = pretrain_config.get_config('minilm')
  with pytest.raises(ValueError, match=message):
    bert_init.init_params({}, copy_bert(tmp_path, edit), c.model)


def test_bert_weights_with_missing_keys_are_named(tmp_path, minilm_params):
  config, params, _ = minilm_params
  folder = copy_bert(tmp_path, drop='encoder.layer.4.intermediate')
  c = pretrain_config.get_config('minilm')
  with pytest.raises(ValueError, match=r'unified\.layer\.4\.intermediate\.'
                     r'dense\.(weight|bias): missing in the BERT checkpoint'):
    bert_init.init_params(params, folder, c.model)


def test_bert_weights_of_another_shape_name_both_shapes(tmp_path,
                                                        minilm_params):
  config, params, _ = minilm_params
  folder = copy_bert(tmp_path)
  st = load_file(os.path.join(folder, 'model.safetensors'))
  st['encoder.layer.2.output.dense.weight'] = np.zeros((384, 1000),
                                                       np.float32)
  save_file(st, os.path.join(folder, 'model.safetensors'))
  c = pretrain_config.get_config('minilm')
  with pytest.raises(ValueError, match=r'unified\.layer\.2\.output\.dense\.'
                     r'weight: the BERT checkpoint .* \(384, 1000\), model '
                     r'\(384, 1536\)'):
    bert_init.init_params(params, folder, c.model)


def test_bert_pytorch_model_bin_with_old_names(tmp_path, minilm_params):
  """The older format: pytorch_model.bin of a BertForPreTraining ('bert.'
  prefixes, LayerNorm gamma/beta, an MLM head to ignore) gives the same
  parameters as the safetensors folder."""
  config, want, taken = minilm_params
  st = load_file(os.path.join(MINILM, 'model.safetensors'))
  old = {'bert.' + k.replace('LayerNorm.weight', 'LayerNorm.gamma')
         .replace('LayerNorm.bias', 'LayerNorm.beta'): torch.from_numpy(v)
         for k, v in st.items()}
  old['cls.predictions.bias'] = torch.zeros(30522)
  folder = tmp_path / 'old_bert'
  folder.mkdir()
  torch.save(old, str(folder / 'pytorch_model.bin'))
  shutil.copy(os.path.join(MINILM, 'config.json'), folder / 'config.json')
  zeros = jax.tree.map(np.zeros_like, want)
  c = pretrain_config.get_config('minilm')
  got, got_taken = bert_init.init_params(zeros, str(folder), c.model)
  assert got_taken == taken
  assert export.trees_equal(got, want)


def test_export_cli_of_a_pretraining_checkpoint(pretrained_tiny, tmp_path):
  """python -m cmal_jax.export --step=2 on conftest's tiny pre-training run:
  PyTorch loads it and hands back the checkpoint's parameters bitwise;
  a second export needs --overwrite."""
  from cmal_jax import checkpoint
  out = str(tmp_path / 'pt')
  r = run_export_cli(f'--workdir={pretrained_tiny}', '--step=2',
                     f'--out={out}')
  assert r.returncode == 0, r.stderr
  assert 'Exported pretrain model' in r.stdout
  saved, where = checkpoint.load_pretrained_params(pretrained_tiny, 2)
  config = json.load(open(os.path.join(out, export.CONFIG_FILE)))
  assert config['source']['checkpoint'] == where
  assert config['model']['num_tags'] == 10  # From the tag head's shape.
  model = torch_model.CMAL.from_pretrained(out)
  assert export.trees_equal(model.jax_params(), saved)
  r = run_export_cli(f'--workdir={pretrained_tiny}', f'--out={out}')
  assert r.returncode == 1 and 'pass --overwrite' in r.stderr
  r = run_export_cli(f'--workdir={pretrained_tiny}', f'--out={out}',
                     '--overwrite', '--step=3')
  assert r.returncode == 1 and 'holds no checkpoint at step 3' in r.stderr
  assert export.trees_equal(  # The failed export left the good one.
      torch_model.CMAL.from_pretrained(out).jax_params(), saved)


def test_bert_folder_without_weights_or_config(tmp_path):
  c = pretrain_config.get_config('minilm')
  with pytest.raises(FileNotFoundError, match='config.json not found'):
    bert_init.init_params({}, str(tmp_path), c.model)
  (tmp_path / 'config.json').write_text(
      open(os.path.join(MINILM, 'config.json')).read())
  with pytest.raises(FileNotFoundError, match='neither model.safetensors nor '
                     'pytorch_model.bin'):
    bert_init.init_params({}, str(tmp_path), c.model)


def test_export_refuses_a_non_empty_folder_and_keeps_it(tmp_path):
  config = export_config('d64h2', 've')
  params = random_params(config)
  out = tmp_path / 'export'
  out.mkdir()
  (out / 'mine.txt').write_text('keep me')
  with pytest.raises(FileExistsError, match='exists and is not empty; pass '
                     '--overwrite'):
    export.write_export(str(out), params, config)
  assert os.listdir(out) == ['mine.txt']
  export.write_export(str(out), params, config, overwrite=True)
  assert sorted(os.listdir(out)) == [export.CONFIG_FILE, export.WEIGHTS_FILE,
                                     export.BERT_DIR]
  assert not [p for p in os.listdir(tmp_path) if p != 'export']  # No temp.


def test_a_failed_export_leaves_the_old_one(tmp_path, monkeypatch):
  config = export_config('d64h2', 've')
  params = random_params(config)
  out = str(tmp_path / 'export')
  export.write_export(out, params, config)
  before = load_file(os.path.join(out, export.WEIGHTS_FILE))

  def fail(*args, **kwargs):
    raise OSError('disk full')
  monkeypatch.setattr(export, 'write_json', fail)
  with pytest.raises(OSError, match='disk full'):
    export.write_export(out, random_params(config, seed=5), config,
                        overwrite=True)
  after = load_file(os.path.join(out, export.WEIGHTS_FILE))
  assert before.keys() == after.keys()
  assert all(np.array_equal(before[k], after[k]) for k in before)
  assert sorted(os.listdir(tmp_path)) == ['export']


def test_from_pretrained_names_missing_weights(tmp_path):
  config = export_config('d64h2', 'rec')
  out = str(tmp_path / 'export')
  export.write_export(out, random_params(config), config)
  path = os.path.join(out, export.WEIGHTS_FILE)
  st = load_file(path)
  del st['rec_head.score.weight']
  save_file(st, path)
  with pytest.raises(ValueError, match=r'rec_head\.score\.weight: missing in '):
    torch_model.CMAL.from_pretrained(out)


def run_export_cli(*args):
  return subprocess.run(
      [sys.executable, '-m', 'cmal_jax.export', *args], capture_output=True,
      text=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_export_cli_errors(tmp_path):
  r = run_export_cli(f'--workdir={tmp_path}', f'--out={tmp_path / "x"}')
  assert r.returncode == 1
  assert 'export: error: ' in r.stderr and 'has no config.json' in r.stderr
  (tmp_path / 'config.json').write_text(
      pretrain_config.get_config('tiny').to_json())
  r = run_export_cli(f'--workdir={tmp_path}', f'--out={tmp_path / "x"}')
  assert r.returncode == 1
  assert f'export: error: {tmp_path} holds no checkpoint' in r.stderr
  assert not os.path.exists(tmp_path / 'x')
