"""Images through the pixel backbone (model.visual.input='pixels').

Pre-training on the synthetic world from pixels, with the world's boxes and
with the grid, runs and its loss falls; REC fine-tunes from that pixel
checkpoint and evaluates; fine-tuning reads an image folder (images.json
from COCO instances, a RefCOCO+ split; VQA v2, SNLI-VE and NLVR2 samples
of test_formats); the COCO-instances and VG-objects
readers on hand-written samples; corrupt or missing images are named;
images shard with the batch on 8 devices; and a region model is untouched
by the pixel fields.

The two pre-training runs share one compiled step (same shapes: R = 9 = the
3 x 3 grid) through the session's compilation cache.
"""

import json
import os
import pickle
import re
import textwrap

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from cmal_jax import (checkpoint, configlib, finetune, jobs, run_identity,
                      pretraining, train_step)
from cmal_jax.data import (image_store, pipeline, records, task_pipeline,
                           tasks)
from cmal_jax.world import scenes, task_examples
from cmal_jax.convert.formats import FormatError, image_boxes, read_refcoco
from cmal_jax.convert.formats import (read_nlvr2, read_snli_ve, read_vqa_v2,
                                   write_task_split)
from cmal_jax.export import export
from cmal_testutil import fast_step, random_batch, run_with_8_devices, shrink
# The hand-written samples of the official formats.
from test_formats import (_annotation, _jsonl, _nlvr2_line, _question,
                          _ve_line, _vqa_files)
from configs import finetune as finetune_config
from configs import pretrain

STEPS = 30  # Logged every 10: the loss of steps 1-10 against 21-30.
GRID = 3


def pixel_pretrain_config(directory, boxes):
  c = pretrain.get_config('tiny')
  c.data.dir = directory
  c.model.visual.input = 'pixels'
  c.model.visual.boxes = boxes
  c.model.visual.grid_size = GRID
  c.data.max_regions = GRID * GRID  # The grid's R: one program for both.
  c.total_steps = STEPS
  c.checkpoint_every = STEPS
  c.eval.batch_size = 32
  c.eval.retrieval_images = 8
  return fast_step(c)  # Both runs' steps: one compile, through the cache.


@pytest.fixture(scope='module')
def pixel_world(tmp_path_factory):
  """A world whose records carry PNG images: pretrain 256, val 32."""
  d = str(tmp_path_factory.mktemp('pixel_world'))
  params = scenes.WorldParams(feature_dim=64, images=True)
  scenes.generate_split(d, 'pretrain', 256, params, seed=0)
  scenes.generate_split(d, 'val', 32, params, seed=0)
  return d


def first_and_last_loss(workdir):
  lines = [json.loads(l) for l in open(os.path.join(workdir,
                                                    'metrics.jsonl'))]
  losses = [l['loss'] for l in lines if 'loss' in l]
  assert len(losses) == STEPS // 10, lines
  return losses[0], losses[-1]


@pytest.fixture(scope='module')
def pixel_pretrained(pixel_world, tmp_path_factory, compilation_cache):
  """(workdir, results) of pixel pre-training with the world's boxes."""
  workdir = str(tmp_path_factory.mktemp('pixel_pretrain'))
  results = jobs.train_and_evaluate(pixel_pretrain_config(pixel_world,
                                                           'given'), workdir)
  return workdir, results


def test_pretraining_from_pixels_with_boxes(pixel_pretrained):
  workdir, results = pixel_pretrained
  first, last = first_and_last_loss(workdir)
  print(f'pixels, given boxes: loss {first:.3f} -> {last:.3f}')
  assert last < first - 1.0, (first, last)
  # Anchors exist (the boxes carry tags) and AMC was evaluated on them.
  assert results['amc_anchors'] > 0
  assert 0 <= results['amc_pair_acc'] <= 1
  assert results['data_stats']['skipped_image'] == 0
  assert results['retrieval_images'] == 8


# Slow (a second whole pixel run): grid regions are covered in the default
# run by test_semmim.py's grid test, the NaN hook on region batches by
# test_reliability.py; on pixel batches it runs only here.
@pytest.mark.slow
def test_pretraining_from_pixels_on_the_grid(pixel_world, tmp_path,
                                             compilation_cache):
  c = pixel_pretrain_config(pixel_world, 'grid')
  # The NaN hook of pixel batches (their boxes carry it): one update of the
  # middle log window is skipped, the first and last stay finite.
  c.debug_nan_steps = (15,)
  results = jobs.train_and_evaluate(c, str(tmp_path))
  first, last = first_and_last_loss(str(tmp_path))
  print(f'pixels, {GRID}x{GRID} grid: loss {first:.3f} -> {last:.3f}')
  assert last < first - 0.5, (first, last)
  assert results['nonfinite_skips'] == 1
  # Grid cells have no tags: no anchors, so AMC has nothing to score.
  assert results['amc_anchors'] == 0
  assert results['data_stats']['regions_truncated'] == 0


def test_rec_finetunes_from_the_pixel_checkpoint(pixel_pretrained, tmp_path):
  workdir, _ = pixel_pretrained
  c = finetune_config.get_config('rec,tiny')
  c.model.visual.input = 'pixels'
  c.model.visual.grid_size = GRID
  c.data.max_regions = GRID * GRID
  c.init_from = workdir
  # Plumbing only: 4 steps on a 32/16/16 world, evaluated at the end (as
  # cmal_testutil.finetune_tiny; the model is not shrunk: it loads the
  # pixel checkpoint's layers).
  c.total_steps, c.log_every, c.checkpoint_every = 4, 2, 4
  c.eval.every_steps = 0
  c.world.num_train, c.world.num_eval, c.world.num_test = 32, 16, 16
  results = jobs.train_and_evaluate(c, str(tmp_path / 'rec'))
  for split in ('val', 'test'):
    assert 0 <= results[split]['accuracy'] <= 1
    assert results[split]['num_examples'] == c.world.num_test
  rows = [json.loads(l) for l in open(tmp_path / 'rec' / 'predictions' /
                                      'rec_test.jsonl')]
  assert len(rows) == c.world.num_test and all(len(r['box']) == 4
                                               for r in rows)
  # What init_from took: the encoders and the backbone.
  pretrained, _ = checkpoint.load_pretrained_params(workdir)
  assert 'pixels' in pretrained
  assert 'pixels' in train_step.pretrained_lr(c)[0]


def test_pixel_and_region_checkpoints_are_not_mixed(pixel_pretrained,
                                                    tmp_path):
  workdir, _ = pixel_pretrained
  # init_from: a region model from a pixel checkpoint, named both ways.
  c = finetune_config.get_config('rec,tiny')
  c.init_from = workdir
  with pytest.raises(ValueError, match=r"was pre-trained on pixels and "
                     r"this config reads regions"):
    finetune.load_init_params(c)
  # resume: the signature differs in model.visual.input.
  region = pretrain.get_config('tiny')
  pixel = pixel_pretrain_config('', 'given')
  mismatches = run_identity.signature_mismatches(run_identity.signature(pixel),
                                           run_identity.signature(region))
  assert "model.visual.input: checkpoint 'pixels', config 'regions'" in (
      mismatches)
  # A checkpoint from before model.visual existed is a region one.
  old = run_identity.signature(region)
  del old['model']['visual']
  assert run_identity.signature_mismatches(old, run_identity.signature(region)) == []
  # Pixel runs may change the (unused) region_feat_dim and resume.
  other = pixel_pretrain_config('', 'given')
  other.model.region_feat_dim = 2048
  assert run_identity.signature_mismatches(run_identity.signature(pixel),
                                     run_identity.signature(other)) == []


def test_export_refuses_a_pixel_model(pixel_pretrained, tmp_path):
  workdir, _ = pixel_pretrained
  with pytest.raises(ValueError, match='reads pixels.*no pixel backbone'):
    export.export(workdir, str(tmp_path / 'out'))
  assert not os.path.exists(tmp_path / 'out')


# --------------------------------------------------- config and the model

def test_config_checks_name_the_visual_field():
  c = pixel_pretrain_config('', 'given')
  configlib.validate(c)
  for field, value, message in (
      ('input', 'jpeg', 'must be one of'),
      ('boxes', 'detector', 'must be one of'),
      ('kind', 'resnet', 'PixelConfig.kind'),
      ('width', 0, 'must be >= 1'),
      ('image_size', 60, 'multiple of model.visual.patch_size=8'),
      ('grid_size', 4, 'gets its 16 grid cells as regions, more than '
       'data.max_regions=9')):
    bad = c.copy_and_resolve_references()
    bad.model.visual[field] = value
    with pytest.raises(ValueError, match=re.escape(
        f'config.model.visual.{field}=') + '.*' + re.escape(message)):
      configlib.validate(bad)


def test_mrc_zeroes_the_pooled_features_of_masked_regions():
  from cmal_jax import objectives
  from cmal_jax.model.cmal import CMAL, ModelConfig
  c = pixel_pretrain_config('', 'given')
  c.loss.mrc = 1.0
  specials = objectives.SpecialTokens(0, 101, 102, 103, 30522)
  batch = random_batch(0, 4, 24, 9, 4, 64)
  del batch['region_feats'], batch['stats']
  batch['images'] = np.random.default_rng(1).integers(0, 256, (4, 64, 64, 3),
                                                      np.uint8)
  inputs, targets = objectives.prepare_inputs(batch, jax.random.key(3), c,
                                              specials)
  assert 'region_feats' not in inputs
  masked = np.asarray(inputs['region_masked'])
  assert masked.shape == (4, 9) and masked.any()
  # The regions MRC scores (matched pairs) are masked ones.
  scored = np.zeros_like(masked)
  for b, (positions, w) in enumerate(zip(targets['mrc_positions'],
                                         targets['mrc_weights'])):
    scored[b, np.asarray(positions)[np.asarray(w)]] = True
  assert (masked | ~scored).all()
  model = CMAL(ModelConfig.from_config(c.model, 10))
  # The backbone (and setup's scalars), not the encoders: a quick init.
  params = jax.jit(lambda r: model.init(
      r, inputs, method='region_feats_from_pixels')['params'])(
          jax.random.key(0))
  assert 'pixels' in params and 'unified' not in params
  pooled = jax.jit(lambda p, x: model.apply(
      {'params': p}, x, method='region_feats_from_pixels'))
  feats = np.asarray(pooled(params, inputs))
  kept = (batch['region_mask'] > 0) & ~masked
  assert np.all(feats[masked] == 0) and np.all(feats[kept] != 0)
  unmasked = np.asarray(pooled(params, {k: v for k, v in inputs.items()
                                        if k != 'region_masked'}))
  np.testing.assert_array_equal(feats[kept], unmasked[kept])


def _regions_model_outputs(c):
  """A tiny regions config's pre-training params (seed 0) and the loss of
  one corrupted random batch, and its REC params."""
  from cmal_jax import objectives
  from cmal_jax.model.cmal import CMAL, ModelConfig
  specials = objectives.SpecialTokens(0, 101, 102, 103, 30522)
  model = CMAL(ModelConfig.from_config(c.model, 10))
  init_inputs, loss = pretraining.pretrain_objectives(model, c, specials)
  params = jax.device_get(nn.unbox(jax.jit(
      lambda r: model.init(r, init_inputs(r))['params'])(jax.random.key(0))))
  batch = random_batch(0, 8, 24, 8, 4, 64)
  del batch['stats']
  prepared = loss.prepare(batch, jax.random.key(1))
  value, _ = jax.jit(loss.loss)(params, prepared, jax.random.key(2),
                                loss.denominators(prepared))
  f = finetune_config.get_config('rec,tiny')
  f.model = c.model
  rec = CMAL(ModelConfig.from_config(f.model, 1), task='rec')
  rec_params = jax.device_get(nn.unbox(jax.jit(
      lambda r: rec.init(r, finetune.init_inputs(f))['params'])(
          jax.random.key(0))))
  return params, float(value), rec_params


def test_regions_model_ignores_the_pixel_fields():
  """With input='regions' the backbone's fields change nothing: the same
  parameters (names, shapes, values), no 'pixels' subtree, the same loss.
  The model shrunk (cmal_testutil.shrink): the same paths, less to compile."""
  base = shrink(pretrain.get_config('tiny'))
  assert base.model.visual.input == 'regions'
  other = shrink(pretrain.get_config('tiny'))
  other.model.visual.update(kind='cnn', width=32, depth=3, patch_size=16,
                            roi_size=2, grid_size=1, image_size=32)
  params, loss, rec_params = _regions_model_outputs(base)
  params2, loss2, rec_params2 = _regions_model_outputs(other)
  assert 'pixels' not in params and 'pixels' not in rec_params
  jax.tree.map(np.testing.assert_array_equal, params, params2)
  jax.tree.map(np.testing.assert_array_equal, rec_params, rec_params2)
  assert np.isfinite(loss) and loss == loss2


# ------------------------------------------------- images from a folder

def _png(path, width, height, seed):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)).save(
      path)


def _coco_folder(root):
  """Three images (one without objects) and their COCO instances JSON."""
  images = root / 'train2014'
  images.mkdir()
  sizes = {9: (80, 60), 25: (40, 50), 30: (64, 64)}
  for i, (w, h) in sizes.items():
    _png(images / f'COCO_train2014_{i:012d}.png', w, h, i)
  instances = {
      'images': [{'id': i, 'file_name': f'COCO_train2014_{i:012d}.png',
                  'width': w, 'height': h} for i, (w, h) in sizes.items()],
      'annotations': [
          {'id': 1, 'image_id': 9, 'bbox': [8, 6, 40, 30], 'category_id': 3},
          {'id': 2, 'image_id': 9, 'bbox': [40, 30, 40.5, 30],
           'category_id': 10},  # Overhangs by 0.5 px: clipped.
          {'id': 3, 'image_id': 25, 'bbox': [0, 0, 20, 25], 'category_id': 3},
      ],
      'categories': [{'id': 3, 'name': 'car'},
                     {'id': 10, 'name': 'traffic light'}],
  }
  path = root / 'instances_train2014.json'
  path.write_text(json.dumps(instances))
  return path, images


def test_coco_instances_reader_writes_an_image_store(tmp_path):
  instances, images = _coco_folder(tmp_path)
  out = tmp_path / 'coco'
  n, skipped = image_boxes.convert_coco_instances(instances, images, out,
                                                  synonyms_path=None)
  assert (n, skipped) == (3, {})
  meta = records.read_meta(str(out))
  assert meta['tags'] == ['car', 'traffic light']
  assert meta['feature_dim'] is None
  entries = json.loads((out / 'images.json').read_text())
  assert entries['9'] == {
      'file': '../train2014/COCO_train2014_000000000009.png',
      'boxes': [[8, 6, 48, 36], [40, 30, 80, 60]],
      'tags': ['car', 'traffic light']}
  assert entries['30']['boxes'] == [] and entries['30']['tags'] == []
  store = image_store.open_image_store(str(out))
  item = store['9']
  assert item['image'].shape == (60, 80, 3) and item['image'].dtype == np.uint8
  np.testing.assert_allclose(item['region_boxes'],
                             [[0.1, 0.1, 0.6, 0.6], [0.5, 0.5, 1.0, 1.0]])
  assert item['region_tags'] == ['car', 'traffic light']


def test_coco_instances_bad_input_is_named_or_counted(tmp_path):
  instances, images = _coco_folder(tmp_path)
  data = json.loads(instances.read_text())
  data['annotations'].append({'id': 4, 'image_id': 25, 'bbox': [30, 0, 20, 5],
                              'category_id': 3})  # 10 px past the right.
  data['images'].append({'id': 77, 'file_name': 'gone.png', 'width': 9,
                         'height': 9})
  instances.write_text(json.dumps(data))
  with pytest.raises(FormatError, match=re.escape(
      f"{instances}: id 4: field 'bbox': [30, 0, 20, 5] reaches outside of "
      'the 40x50 image')):
    image_boxes.read_coco_instances(str(instances), str(images))
  entries, _, skipped = image_boxes.read_coco_instances(
      str(instances), str(images), on_error='skip')
  assert [e['image_id'] for e in entries] == ['9', '30']
  assert skipped == {'bad_box': 1, 'missing_image': 1}


def test_vg_objects_reader(tmp_path):
  root = tmp_path / 'VG'
  (root / 'VG_100K_2').mkdir(parents=True)
  _png(root / 'VG_100K_2' / '1.jpg', 100, 50, 1)  # PNG bytes, any name.
  _png(root / '2.jpg', 40, 40, 2)  # Not in image_data: size from the file.
  objects = [
      {'image_id': 1, 'objects': [
          {'object_id': 10, 'x': 10, 'y': 5, 'w': 30, 'h': 20,
           'names': ['Tree']},
          {'object_id': 11, 'x': 80, 'y': 40, 'w': 40, 'h': 20,
           'names': ['shirts', 'man']},  # Overhangs: clipped to 100x50.
          {'object_id': 12, 'x': 0, 'y': 0, 'w': 5, 'h': 5,
           'names': ['sky']}]},
      {'id': 2, 'objects': [{'x': 1, 'y': 1, 'w': 10, 'h': 10,
                             'names': ['man']}]},
  ]
  image_data = [{'image_id': 1, 'width': 100, 'height': 50,
                 'url': 'https://cs.stanford.edu/people/rak248/VG_100K_2/1.jpg'}]
  (tmp_path / 'objects.json').write_text(json.dumps(objects))
  (tmp_path / 'image_data.json').write_text(json.dumps(image_data))
  (tmp_path / 'objects_vocab.txt').write_text('tree,trees\nman,men,guy\n'
                                              'shirt,shirts\n')
  entries, meta, skipped = image_boxes.read_vg_objects(
      str(tmp_path / 'objects.json'), str(root),
      image_data_path=str(tmp_path / 'image_data.json'),
      vocab_path=str(tmp_path / 'objects_vocab.txt'))
  assert skipped == {}
  assert meta['tags'] == ['tree', 'man', 'shirt']
  assert meta['synonyms']['guy'] == 'man'
  assert entries == [
      {'image_id': '1', 'file': str(root / 'VG_100K_2' / '1.jpg'),
       'boxes': [[10, 5, 40, 25], [80, 40, 100, 50], [0, 0, 5, 5]],
       'tags': ['tree', 'shirt', '']},  # 'sky' is no tag: kept, untagged.
      {'image_id': '2', 'file': str(root / '2.jpg'),
       'boxes': [[1, 1, 11, 11]], 'tags': ['man']}]
  # Without a vocabulary, the most frequent names are the tags.
  _, meta, _ = image_boxes.read_vg_objects(
      str(tmp_path / 'objects.json'), str(root), max_tags=1)
  assert meta == {'tags': ['tree'], 'synonyms': {}}
  # A box wholly outside its image, and an image without a file.
  objects[0]['objects'][2].update(x=120)
  objects.append({'image_id': 3, 'objects': []})
  (tmp_path / 'objects.json').write_text(json.dumps(objects))
  with pytest.raises(FormatError, match=re.escape(
      "image_id 1: field 'objects[2]': [120, 0, 5, 5] covers no area of "
      'the 100x50 image')):
    image_boxes.read_vg_objects(str(tmp_path / 'objects.json'), str(root),
                                image_data_path=str(tmp_path /
                                                    'image_data.json'))
  _, _, skipped = image_boxes.read_vg_objects(
      str(tmp_path / 'objects.json'), str(root),
      image_data_path=str(tmp_path / 'image_data.json'), on_error='skip')
  assert skipped == {'bad_box': 1, 'missing_image': 1}


def _refs(path, refs):
  with open(path, 'wb') as f:
    pickle.dump(refs, f)
  return str(path)


def test_refcoco_on_an_image_folder_feeds_pixel_batches(tmp_path):
  instances, images = _coco_folder(tmp_path)
  out = tmp_path / 'refcoco+'
  image_boxes.convert_coco_instances(instances, images, out)
  store = image_store.open_image_store(str(out))
  refs = _refs(tmp_path / 'refs(unc).p', [
      {'ref_id': 0, 'ann_id': 1, 'image_id': 9, 'split': 'val',
       'sentences': [{'sent': 'the car on the left', 'sent_id': 5}]},
      {'ref_id': 1, 'ann_id': 3, 'image_id': 25, 'split': 'val',
       'sentences': [{'sent': 'small car', 'sent_id': 6},
                     {'sent': 'car in the corner', 'sent_id': 7}]}])
  examples, skipped = read_refcoco(refs, str(instances), split='val',
                                   image_ids=set(store.image_ids()))
  assert skipped == {} and len(examples) == 3
  write_task_split(str(out), 'rec', 'val', examples)
  c = finetune_config.get_config('rec,tiny')
  c.model.visual.input = 'pixels'
  configlib.validate(c)
  ds, info = task_pipeline.make_task_dataset(
      c, str(out), 'rec', 'val', batch_size=4, train=False, seed=0)
  (batch,) = list(ds)
  S, R = c.model.visual.image_size, c.data.max_regions
  assert batch['images'].shape == (4, S, S, 3)
  assert batch['images'].dtype == np.uint8
  assert 'region_feats' not in batch
  np.testing.assert_allclose(batch['region_boxes'][0, :2],
                             [[0.1, 0.1, 0.6, 0.6], [0.5, 0.5, 1.0, 1.0]])
  np.testing.assert_array_equal(batch['region_mask'][:, :3],
                                [[1, 1, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0]])
  assert batch['region_boxes'].shape == (4, R, 4)
  # The gold region is the annotation's own box: IoU 1.
  np.testing.assert_allclose(batch['region_iou'][:3, 0], 1.0, rtol=1e-6)
  np.testing.assert_array_equal(batch['valid'], [1, 1, 1, 0])
  # The resize is the plain one of image_store.resize_image.
  original = np.asarray(Image.open(images / 'COCO_train2014_000000000009.png'))
  np.testing.assert_array_equal(batch['images'][0],
                                image_store.resize_image(original, S))


def test_a_task_example_whose_image_is_corrupt_is_named_or_skipped(tmp_path):
  """Fine-tuning on pixels: data.on_error='raise' names the image file and
  id; 'skip' leaves the example out of evaluation, counted as 'image'."""
  instances, images = _coco_folder(tmp_path)
  out = tmp_path / 'refcoco+'
  image_boxes.convert_coco_instances(instances, images, out)
  refs = _refs(tmp_path / 'refs(unc).p', [
      {'ref_id': 0, 'ann_id': 1, 'image_id': 9, 'split': 'val',
       'sentences': [{'sent': 'the car on the left', 'sent_id': 5}]},
      {'ref_id': 1, 'ann_id': 3, 'image_id': 25, 'split': 'val',
       'sentences': [{'sent': 'small car', 'sent_id': 6}]}])
  examples, _ = read_refcoco(refs, str(instances), split='val')
  write_task_split(str(out), 'rec', 'val', examples)
  path = images / 'COCO_train2014_000000000009.png'
  path.write_bytes(path.read_bytes()[:200])  # Truncated.
  c = finetune_config.get_config('rec,tiny')
  c.model.visual.input = 'pixels'
  read = lambda: task_pipeline.make_task_dataset(
      c, str(out), 'rec', 'val', batch_size=2, train=False, seed=0)[0][0]
  with pytest.raises(image_store.ImageError, match=re.escape(
      f"{path}: image '9': cannot decode the image")):
    read()
  c.data.on_error = 'skip'
  batch = read()
  np.testing.assert_array_equal(batch['valid'], [False, True])
  assert {k: int(v.sum()) for k, v in batch['stats'].items()
          if k.startswith('skipped_') and v.any()} == {'skipped_image': 1}


def test_captions_join_an_image_store_into_pixel_pairs(tmp_path):
  from cmal_jax.convert.formats import captions
  instances, images = _coco_folder(tmp_path)
  image_boxes.convert_coco_instances(instances, images, tmp_path / 'coco')
  (tmp_path / 'captions.jsonl').write_text(
      '{"image_id": 9, "caption": "A car next to a traffic light."}\n'
      '{"image_id": 30, "caption": "Nothing to see."}\n')
  n, skipped = captions.convert_captions(
      'jsonl', str(tmp_path / 'captions.jsonl'), str(tmp_path / 'coco'),
      None, 'pretrain')  # Caption records, joined with images.json.
  assert (n, skipped) == (2, {})
  c = pretrain.get_config('tiny')
  c.model.visual.input = 'pixels'
  c.data.itm_neg_prob, c.data.itm_group = 0.0, 2
  (batch,) = pipeline.make_dataset(c, str(tmp_path / 'coco'), 'pretrain',
                                   batch_size=2, train=False, seed=0)[0]
  assert batch['images'].shape == (2, 64, 64, 3)
  # Both tags are anchors of the first caption ('traffic light' as a
  # two-word n-gram); the second image has no boxes: its 2 x 2 grid.
  assert batch['anchor_valid'][0].sum() == 2
  np.testing.assert_array_equal(batch['region_mask'][1], [1] * 4 + [0] * 4)
  np.testing.assert_array_equal(batch['region_tags'][1], -1)


# ------------------------------------------ every task from the world

@pytest.fixture(scope='module')
def pixel_tasks(tmp_path_factory):
  """The five synthetic tasks (8 examples per split), images in the store."""
  d = str(tmp_path_factory.mktemp('pixel_tasks'))
  task_examples.generate(d, tasks.TASKS, {'train': 8, 'val': 8, 'test': 8},
                       scenes.WorldParams(feature_dim=64, images=True), seed=0)
  return d


def pixel_task_config(task):
  c = finetune_config.get_config(f'{task},tiny')
  c.model.visual.input = 'pixels'
  c.eval.batch_size = 8
  return c


@pytest.mark.parametrize('task', tasks.TASKS)
def test_every_task_batches_images(task, pixel_tasks):
  c = pixel_task_config(task)
  ds, _ = task_pipeline.make_task_dataset(c, pixel_tasks, task, 'val',
                                          batch_size=8, train=False, seed=0)
  batch = ds[0]
  lead = (8, 2) if task == 'nlvr2' else (8,)
  S, R = c.model.visual.image_size, c.data.max_regions
  assert batch['images'].shape == lead + (S, S, 3)
  assert batch['images'].dtype == np.uint8 and 'region_feats' not in batch
  inputs = finetune.model_inputs(batch, task)
  rows = 16 if task == 'nlvr2' else 8
  assert inputs['images'].shape == (rows, S, S, 3)
  assert inputs['region_boxes'].shape == (rows, R, 4)
  assert set(inputs) == {'input_ids', 'text_mask', 'images', 'region_boxes',
                         'region_mask'}


@pytest.mark.parametrize('task', ('nlvr2', 'retrieval'))
def test_nlvr2_and_retrieval_evaluate_from_pixels(task, pixel_tasks):
  from cmal_jax import sharding
  from cmal_jax.model.cmal import CMAL, ModelConfig
  c = pixel_task_config(task)
  mesh, rules = sharding.mesh_from_config(c), sharding.rules(c)
  model = CMAL(ModelConfig.from_config(c.model, 1), task=task)
  params = nn.unbox(jax.jit(
      lambda r: model.init(r, finetune.init_inputs(c))['params'])(
          jax.random.key(0)))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    predict = (None if task == 'retrieval' else
               jax.jit(finetune.make_predict_step(model, c)))
    results = finetune.evaluate_split(model, params, c, pixel_tasks, 'val',
                                      mesh, predict)
  metric = 'mean_recall' if task == 'retrieval' else 'accuracy'
  assert 0 <= results[metric] <= 1
  if task == 'retrieval':  # Each image embedded once, 5 captions each.
    assert (results['num_images'], results['num_captions']) == (8, 40)


# --------------------------------------------------- bad images are named

def test_missing_or_corrupt_image_files_are_named(tmp_path):
  instances, images = _coco_folder(tmp_path)
  image_boxes.convert_coco_instances(instances, images, tmp_path / 'coco')
  store = image_store.open_image_store(str(tmp_path / 'coco'))
  path = images / 'COCO_train2014_000000000009.png'
  path.write_bytes(path.read_bytes()[:200])  # Truncated.
  with pytest.raises(image_store.ImageError, match=re.escape(
      f"{path}: image '9': cannot decode the image")):
    store['9']
  os.remove(images / 'COCO_train2014_000000000025.png')
  with pytest.raises(image_store.ImageError, match=re.escape(
      f"{images / 'COCO_train2014_000000000025.png'}: image '25': cannot "
      'read the image file')):
    store['25']


def test_a_corrupt_pair_image_is_named_or_skipped_and_counted(tmp_path):
  params = scenes.WorldParams(feature_dim=64, images=True)
  pairs = [scenes.make_pair(0, 'pretrain', i, params) for i in range(8)]
  pairs[3]['image'] = pairs[3]['image'][:100]
  path = records.split_path(str(tmp_path), 'pretrain')
  records.write_records(path, pairs)
  records.write_meta(str(tmp_path), scenes.make_meta(params, 0,
                                                    {'pretrain': 8}))
  c = pretrain.get_config('tiny')
  c.model.visual.input = 'pixels'
  with pytest.raises(records.RecordError, match=re.escape(
      f"{path}: record 3: field 'image': image 'pretrain-0-0000003': cannot "
      'decode the image')):
    list(pipeline.make_dataset(c, str(tmp_path), 'pretrain', batch_size=8,
                               train=False, seed=0)[0])
  c.data.on_error = 'skip'
  (batch,) = pipeline.make_dataset(c, str(tmp_path), 'pretrain',
                                   batch_size=8, train=False, seed=0)[0]
  assert batch['stats']['skipped_image'].sum() == 1
  assert set(batch['stats']) == set(pipeline.PIXEL_STAT_KEYS)


# ----------------------------------------- images shard with the batch

_SHARD_SCRIPT = textwrap.dedent('''
    import json, sys
    import flax.linen as nn
    import jax
    import numpy as np
    from cmal_jax import objectives, pretraining, sharding, train_step
    from cmal_jax.data import pipeline
    from cmal_jax.model.cmal import CMAL, ModelConfig
    from configs.pretrain import get_config
    from cmal_testutil import random_batch, shrink

    specials = objectives.SpecialTokens(0, 101, 102, 103, 30522)
    B, S = 16, 64
    host = random_batch(0, B, 24, 8, 4, 64)
    del host['region_feats']
    host['images'] = np.random.default_rng(0).integers(
        0, 256, (B, S, S, 3), np.uint8)
    host['stats']['skipped_image'] = np.zeros(B, np.int32)

    def run(preset, shape, devices):
        config = shrink(get_config('tiny'))  # The pixel path, less to compile.
        config.model.visual.input = 'pixels'
        config.batch_size, config.sharding = B, preset
        config.mesh.shape = shape
        mesh = sharding.mesh_from_config(config, devices=devices)
        rules = sharding.rules(config)
        model = CMAL(ModelConfig.from_config(config.model, num_tags=10))
        init_inputs, loss = pretraining.pretrain_objectives(model, config, specials)
        tx, schedule = train_step.make_optimizer(config)
        state, shardings = train_step.create_train_state(
            model, init_inputs, pipeline.stat_keys(config), tx, config, mesh,
            rules)
        batch = sharding.global_batch(host, mesh)
        shard = list(batch['images'].addressable_shards[0].data.shape)
        step = train_step.jit_train_step(loss, config, schedule, shardings, mesh)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            state, metrics = step(state, batch)
        return shard, float(metrics['loss']), jax.device_get(state.params)

    ref_shard, ref_loss, ref_params = run('dp', (1, 1, 1), jax.devices()[:1])
    shard, loss, params = run('fsdp', (2, 4, 1), jax.devices())
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(
        jax.tree.leaves(ref_params), jax.tree.leaves(params)))
    print(json.dumps(dict(ref_shard=ref_shard, shard=shard, ref_loss=ref_loss,
                          loss=loss, diff=diff)))
''')


# Slow (8 devices in a subprocess, its own compile): test_sharding.py
# covers the sharding presets, the tests above the pixel path.
@pytest.mark.slow
def test_images_are_batch_sharded_on_8_devices():
  proc = run_with_8_devices(_SHARD_SCRIPT)
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out['ref_shard'] == [16, 64, 64, 3]
  assert out['shard'] == [2, 64, 64, 3]  # 16 rows over data x fsdp = 8.
  np.testing.assert_allclose(out['loss'], out['ref_loss'], rtol=1e-5)
  assert out['diff'] < 1e-5


# ------------------------------- official task formats on an image folder

def _task_image_folder(root):
  """PNGs of VQA / SNLI-VE images '9' (80x60), '25' (40x50) and of two
  NLVR2 pairs, and their images.json (no boxes: the grid)."""
  sizes = {'9': (80, 60), '25': (40, 50), 'dev-1-0-img0': (64, 32),
           'dev-1-0-img1': (32, 64), 'dev-2-0-img0': (50, 50),
           'dev-2-0-img1': (70, 40)}
  for seed, (image_id, (w, h)) in enumerate(sizes.items()):
    _png(root / f'{image_id}.png', w, h, seed)
  image_store.write_image_store(str(root), [
      (image_id, {'file': f'{image_id}.png'}) for image_id in sizes])
  return set(sizes)


def _official_task_files(tmp_path, image_ids):
  """{task: (examples, skipped)} of test_formats' hand-written samples,
  one file per task, read against the image folder's ids."""
  q, a = _vqa_files(tmp_path, [_question(9000, 9, 'What color is it?'),
                               _question(25000, 25, 'Is it blue?')],
                    [_annotation(9000, 9, ['red', 'red', 'red', 'blue']),
                     _annotation(25000, 25, ['yes', 'no'])])
  ve = _jsonl(tmp_path / 'snli_ve_dev.jsonl', [
      _ve_line('p1', 9, 'A dog runs.', 'entailment'),
      _ve_line('p2', '25', 'Cats sleep.', 'contradiction'),
      _ve_line('p3', '9', 'It is noon.', 'neutral')])
  nlvr2 = _jsonl(tmp_path / 'dev.json', [
      _nlvr2_line('dev-1-0-0', 'The left image has more.', 'True'),
      _nlvr2_line('dev-2-0-1', 'Both are empty.', 'False')])
  return {
      'vqa': read_vqa_v2(q, a, image_ids=image_ids),
      've': read_snli_ve(ve, image_ids=image_ids),
      'nlvr2': read_nlvr2(nlvr2, image_ids=image_ids)}


def test_vqa_ve_and_nlvr2_formats_on_an_image_folder(tmp_path):
  out = tmp_path / 'images'
  out.mkdir()
  image_ids = _task_image_folder(out)
  # VQA as `train`: its answer vocabulary is built from vqa_train.
  splits = {'vqa': 'train', 've': 'val', 'nlvr2': 'val'}
  for task, (examples, skipped) in _official_task_files(tmp_path,
                                                        image_ids).items():
    assert skipped == {}
    write_task_split(str(out), task, splits[task], examples)
  batches, infos = {}, {}
  for task, split in splits.items():
    c = pixel_task_config(task)
    ds, infos[task] = task_pipeline.make_task_dataset(
        c, str(out), task, split, batch_size=4, train=False, seed=0)
    (batches[task],) = list(ds)
    S = c.model.visual.image_size
    lead = (4, 2) if task == 'nlvr2' else (4,)
    assert batches[task]['images'].shape == lead + (S, S, 3), task
    assert batches[task]['images'].dtype == np.uint8
    assert 'region_feats' not in batches[task]
  # Rows are the examples in file order, padded to 4 (valid 0).
  vqa = batches['vqa']
  vocab = infos['vqa']['answer_vocab']
  assert sorted(vocab) == ['blue', 'no', 'red', 'yes']
  np.testing.assert_array_equal(vqa['valid'], [1, 1, 0, 0])
  np.testing.assert_array_equal(vqa['question_id'][:2], [9000, 25000])
  np.testing.assert_allclose(vqa['targets'][0, vocab.index('red')], 1.0)
  np.testing.assert_allclose(vqa['targets'][0, vocab.index('blue')], 1 / 3)
  np.testing.assert_allclose(vqa['targets'][1, [vocab.index('yes'),
                                                vocab.index('no')]],
                             [1 / 3, 1 / 3])
  np.testing.assert_array_equal(batches['ve']['label'][:3], [
      tasks.VE_LABELS.index(l) for l in ('entailment', 'contradiction',
                                         'neutral')])
  np.testing.assert_array_equal(batches['ve']['valid'], [1, 1, 1, 0])
  nlvr2 = batches['nlvr2']
  np.testing.assert_array_equal(nlvr2['label'][:2], [1, 0])
  # Each image of the pair is its own file, resized as the pipeline does.
  S = pixel_task_config('nlvr2').model.visual.image_size
  right = np.asarray(Image.open(out / 'dev-1-0-img1.png'))
  np.testing.assert_array_equal(nlvr2['images'][0, 1],
                                image_store.resize_image(right, S))
  # No boxes: the G x G grid, for both images.
  G = pixel_task_config('nlvr2').model.visual.grid_size
  assert nlvr2['region_mask'][:2].sum(-1).tolist() == [[G * G] * 2] * 2
