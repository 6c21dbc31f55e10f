"""data.source='tfds:...': pairs read from TFDS datasets that the tests
build themselves (ArrayRecord format; tensorflow-datasets without
TensorFlow), compared with what the builders yielded, through to 5
pre-training steps."""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags
from ml_collections import config_flags
from tensorflow_datasets.core import registered

from cmal_jax import jobs
from cmal_jax.data import anchors, pipeline, records, tfds_source
from cmal_jax.data.shapes import Shapes
from cmal_jax.world import scenes
from cmal_testutil import F, good_pair

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM = {'train': 20, 'val': 16}
EMPTY_INDEX = 3  # This pair's regions are dropped: N == 0 must round-trip.
BAD_INDEX, BAD_WIDTH = 4, F - 1


def yielded_pair(split, i):
  """Pair i of a split as the builders yield it (a world pair)."""
  pair = good_pair(i, 'pretrain' if split == 'train' else split)
  if i == EMPTY_INDEX:
    pair.update(region_feats=np.zeros((0, F), np.float32),
                region_boxes=np.zeros((0, 4), np.float32),
                region_tags=[], region_conf=np.zeros(0, np.float32))
  return pair


def our_features(width=F):
  """Our own field names: the defaults of config.data.tfds_features."""
  return tfds.features.FeaturesDict({
      'image_id': tfds.features.Text(),
      'caption': tfds.features.Text(),
      # Two unknown dimensions need an encoding (TFDS's rule).
      'region_feats': tfds.features.Tensor(
          shape=(None, width), dtype=np.float32,
          encoding='zlib' if width is None else 'none'),
      'region_boxes': tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
      'region_tags': tfds.features.Sequence(tfds.features.Text()),
      'region_conf': tfds.features.Tensor(shape=(None,), dtype=np.float32),
  })


# Not registered: reading goes through the prepared files alone, as it does
# for a user whose process never imports the builder.
with registered.skip_registration():

  class CmalPairsOurNames(tfds.core.GeneratorBasedBuilder):
    """World pairs under our names, tags as strings."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      # Unshuffled, so record i is the i-th example yielded.
      return tfds.core.DatasetInfo(builder=self, features=our_features(),
                                   disable_shuffling=True)

    def _split_generators(self, dl_manager):
      return {s: self._generate_examples(s) for s in NUM}

    def _generate_examples(self, split):
      for i in range(NUM[split]):
        yield i, yielded_pair(split, i)

  class CmalPairsOtherNames(tfds.core.GeneratorBasedBuilder):
    """The same pairs laid out COCO-style: several captions, objects with
    BBoxFeature boxes (ymin, xmin, ymax, xmax) and ClassLabel tags."""
    VERSION = tfds.core.Version('1.0.0')
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name='coco_like')]

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({
              'id': tfds.features.Scalar(dtype=np.int64),
              'captions': tfds.features.Sequence(
                  {'text': tfds.features.Text()}),
              'objects': tfds.features.Sequence({
                  'feature': tfds.features.Tensor(shape=(F,),
                                                  dtype=np.float32),
                  'bbox': tfds.features.BBoxFeature(),
                  'label': tfds.features.ClassLabel(
                      names=list(scenes.WORLD_TAGS)),
                  'score': tfds.features.Scalar(dtype=np.float32),
              }),
          }), disable_shuffling=True)

    def _split_generators(self, dl_manager):
      return {s: self._generate_examples(s) for s in NUM}

    def _generate_examples(self, split):
      for i in range(NUM[split]):
        p = yielded_pair(split, i)
        objects = [
            dict(feature=f, label=tag or -1, score=c,
                 bbox=tfds.features.BBox(ymin=b[1], xmin=b[0], ymax=b[3],
                                         xmax=b[2]))
            for f, b, tag, c in zip(p['region_feats'], p['region_boxes'],
                                    p['region_tags'], p['region_conf'])]
        yield i, dict(id=1000 + i, objects=objects,
                      captions=[{'text': p['caption']},
                                {'text': 'a second caption, not used'}])

  class CmalPairsBadWidth(tfds.core.GeneratorBasedBuilder):
    """Our names, any feature width; pair BAD_INDEX is BAD_WIDTH wide."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=our_features(None),
                                   disable_shuffling=True)

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      for i in range(6):
        p = yielded_pair('train', i)
        if i == BAD_INDEX:
          p['region_feats'] = p['region_feats'][:, :BAD_WIDTH]
        yield i, p


OTHER_SOURCE = 'tfds:cmal_pairs_other_names:coco_like'
OTHER_FEATURES = dict(image_id='id', caption='captions/text',
                      region_feats='objects/feature',
                      region_boxes='objects/bbox',
                      region_tags='objects/label', region_conf='objects/score')


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  """A TFDS data dir with the three datasets prepared as ArrayRecord."""
  d = str(tmp_path_factory.mktemp('tfds'))
  for builder in (CmalPairsOurNames(data_dir=d, file_format='array_record'),
                  CmalPairsOtherNames(data_dir=d, config='coco_like',
                                      file_format='array_record'),
                  CmalPairsBadWidth(data_dir=d, file_format='array_record')):
    builder.download_and_prepare()
  return d


def tiny(source, tfds_dir, data_dir='', features=None):
  """The tiny pre-training config reading data.source from tfds_dir."""
  from configs import pretrain
  c = pretrain.get_config('tiny')
  c.data.source, c.data.tfds_data_dir, c.data.dir = source, tfds_dir, data_dir
  c.data.tfds_features.update(features or {})
  return c


def assert_pair_equal(got, want):
  """A pair read back equals the one yielded, field by field."""
  assert got['image_id'] == want['image_id']
  assert got['caption'] == want['caption']
  assert got['region_tags'] == list(want['region_tags'])
  for field in ('region_feats', 'region_boxes', 'region_conf'):
    assert got[field].dtype == np.float32, field
    np.testing.assert_array_equal(got[field], want[field], err_msg=field)


# ------------------------------------------------------------------ reading

def test_our_names_round_trip_with_scanned_meta(tfds_dir, tmp_path):
  meta_dir = str(tmp_path / 'meta')
  meta = tfds_source.main([
      '--source=tfds:cmal_pairs_our_names/train', '--splits=train,val',
      f'--tfds_data_dir={tfds_dir}', f'--out={meta_dir}'])
  found = {t for s in NUM for i in range(NUM[s])
           for t in yielded_pair(s, i)['region_tags'] if t}
  assert meta['tags'] == sorted(found)
  assert (meta['feature_dim'], meta['splits']) == (F, NUM)
  config = tiny('tfds:cmal_pairs_our_names/train', tfds_dir, meta_dir)
  for split, ours in (('train', 'pretrain'), ('val', 'val')):
    source, name, read_meta = tfds_source.open_pairs(config, 'unused', ours)
    assert name == f'tfds:cmal_pairs_our_names/{split}'
    assert read_meta == records.read_meta(meta_dir)  # data.dir's meta.json.
    assert len(source) == NUM[split]
    for i in range(NUM[split]):
      assert_pair_equal(source[i], yielded_pair(split, i))


def test_other_names_through_the_feature_mapping(tfds_dir):
  config = tiny(f'{OTHER_SOURCE}/train', tfds_dir, features=OTHER_FEATURES)
  source, name, meta = tfds_source.open_pairs(config, 'unused', 'pretrain')
  assert name == f'{OTHER_SOURCE}/train'
  # Derived: the ClassLabel's names, the feature's width, no synonyms.
  assert meta == dict(tags=list(scenes.WORLD_TAGS), synonyms={},
                      feature_dim=F)
  assert len(source) == NUM['train']
  for i in range(NUM['train']):
    want = dict(yielded_pair('train', i), image_id=str(1000 + i))
    assert_pair_equal(source[i], want)  # Boxes back in (x1, y1, x2, y2).


def test_split_slices_and_absent_optional_fields(tfds_dir):
  config = tiny(f'{OTHER_SOURCE}/train[:5]', tfds_dir,
                features=dict(OTHER_FEATURES, image_id='', region_tags='',
                              region_conf=''))
  source, _, meta = tfds_source.open_pairs(config, 'unused', 'pretrain')
  assert len(source) == 5 and meta['tags'] == []
  for i in range(5):
    pair, n = source[i], len(yielded_pair('train', i)['region_conf'])
    assert pair['image_id'] == str(i)
    assert pair['region_tags'] == [''] * n
    np.testing.assert_array_equal(pair['region_conf'], np.ones(n))


def test_bad_width_names_dataset_record_and_field(tfds_dir):
  spec = tfds_source.parse_source('tfds:cmal_pairs_bad_width/train')
  source = tfds_source.TfdsPairSource(spec, 'train', feature_dim=F,
                                      data_dir=tfds_dir)
  with pytest.raises(records.RecordError) as e:
    source[BAD_INDEX]
  assert str(e.value).startswith(
      f"tfds:cmal_pairs_bad_width/train: record {BAD_INDEX}: field "
      f"'region_feats': feature width {BAD_WIDTH} does not match")
  # data.on_error='skip' replaces it by the next good record, and counts it.
  vocab = anchors.TagVocab.from_meta({'tags': list(scenes.WORLD_TAGS)})
  decode = pipeline.RecordDecoder(
      source, path=source.label, vocab=vocab, on_error='skip',
      shapes=Shapes(24, 8, 4, F))
  replaced = decode(BAD_INDEX)
  assert replaced['image_id'] == yielded_pair('train', BAD_INDEX + 1)[
      'image_id']
  assert replaced['skipped'] == {'region_feats': 1}


def test_config_errors_say_what_to_do(tfds_dir):
  other = tiny(f'{OTHER_SOURCE}/train', tfds_dir,
               features=dict(OTHER_FEATURES, region_feats='objects/feats'))
  with pytest.raises(ValueError, match=r"tfds_features.region_feats="
                     r"'objects/feats': the dataset has no such feature; "
                     r"its features are \[.*'objects/feature'"):
    tfds_source.open_pairs(other, 'unused', 'pretrain')
  strings = tiny('tfds:cmal_pairs_our_names/train', tfds_dir)
  with pytest.raises(ValueError, match='tags .* are strings.*meta.json'):
    tfds_source.open_pairs(strings, 'unused', 'pretrain')  # No data.dir.
  wrong_width = tiny(f'{OTHER_SOURCE}/train', tfds_dir,
                     features=OTHER_FEATURES)
  wrong_width.model.region_feat_dim = 2 * F
  with pytest.raises(ValueError, match=r'feature_dim=64 \(derived from the '
                     r'dataset\) does not match config model.region_feat_dim'
                     r'=128'):
    tfds_source.open_pairs(wrong_width, 'unused', 'pretrain')
  with pytest.raises(ValueError, match="cannot open the prepared TFDS "
                     "dataset 'missing'.*tfds_data_dir"):
    tfds_source.open_pairs(tiny('tfds:missing/train', tfds_dir), '', 'val')


@pytest.mark.parametrize('source', ['tfds:', 'tfds:x/', 'tfds:x:a:b/train',
                                    'gs://bucket/x'])
def test_malformed_source(source):
  with pytest.raises(ValueError, match=r"expected '' \(records in data.dir"):
    tfds_source.parse_source(source)


def test_source_syntax():
  spec = tfds_source.parse_source('tfds:coco:2017/train[:90%]')
  assert (spec.tfds_name, spec.split) == ('coco/2017', 'train[:90%]')
  assert spec.label('val') == 'tfds:coco:2017/val'
  assert tfds_source.parse_source('tfds:coco').split == ''


# ------------------------------------------------------------- pre-training

# Slow (a whole run from CLI flags): the tests above cover the TFDS reader in
# the default run; the training loop is the same as for our records.
@pytest.mark.slow
def test_five_pretraining_steps_from_flags(tfds_dir, tmp_path):
  mapping = [f'--config.data.tfds_features.{k}={v}'
             for k, v in OTHER_FEATURES.items()]
  argv = ['test', f'--config={REPO}/configs/pretrain.py:tiny',
          f'--config.data.source={OTHER_SOURCE}/train',
          f'--config.data.tfds_data_dir={tfds_dir}', *mapping,
          '--config.total_steps=5', '--config.log_every=5',
          '--config.eval.batch_size=16', '--config.eval.retrieval_images=8']
  # As cmal_jax.main parses its command line.
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values,
                                  lock_config=True, sys_argv=argv)
  flag_values(argv)
  workdir = str(tmp_path / 'run')
  results = jobs.train_and_evaluate(flag_values.config, workdir)
  assert not os.path.exists(os.path.join(workdir, 'data'))  # No world made.
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [m for m in map(json.loads, f) if 'loss' in m]
  assert [m['step'] for m in lines] == [5]
  assert np.isfinite(lines[0]['loss']) and lines[0]['loss'] > 0
  assert results['num_pairs'] == NUM['val']  # eval_split 'val' of the same.
  assert 0 <= results['amc_pair_acc'] <= 1
