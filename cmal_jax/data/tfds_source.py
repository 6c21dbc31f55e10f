r"""Pre-training pairs from a prepared TFDS dataset (config.data.source).

  --config.data.source=tfds:NAME[:CONFIG][/SPLIT]
  --config.data.tfds_data_dir=DIR           ('' = TFDS's own default)
  --config.data.tfds_features.caption=captions/text   (one per field)

reads a TFDS dataset prepared in the ArrayRecord file format (`tfds build
--file_format=array_record`, or a builder's `file_format='array_record'`)
through `tfds.data_source`: random access, no tf.data and no TensorFlow.
SPLIT (default config.data.train_split) is the training split; evaluation
reads config.data.eval_split of the same dataset. Both may be TFDS split
slices ('train[:95%]', 'train[95%:]').

Each TFDS example becomes one pair record (records.py) and is checked with
records.validate_pair, so a bad one names the dataset, split, record and
field: `tfds:NAME/SPLIT: record 7: field 'region_feats': ...`.
config.data.tfds_features maps each of our fields to a '/'-separated path
into the TFDS example (its defaults are our own names):

  image_id      Text or integer; '' = absent: the record index stands in.
  caption       Text; a sequence of texts (e.g. 'captions/text') gives its
                first one: one pair per TFDS example.
  region_feats  float tensor [N, F], or a Sequence of [F] tensors.
  region_boxes  [N, 4] normalised (x1, y1, x2, y2); a tfds BBoxFeature
                (ymin, xmin, ymax, xmax) is reordered to ours.
  region_tags   Sequence of Text or of ClassLabel (-1 = no tag, "");
                '' = absent: no region has a tag.
  region_conf   float [N]; '' = absent: every region gets confidence 1.

The tag vocabulary, synonyms and feature width (records.py's meta) come
from config.data.dir's meta.json when that folder has one; otherwise they
are derived: feature_dim from the dataset's region_feats shape (else its
first example), tags from the names of a ClassLabel tag feature, no
synonyms. Tags stored as strings have no names to derive: write a
meta.json from the tags the dataset holds with

  python -m cmal_jax.data.tfds_source --source=tfds:NAME/SPLIT --out=DIR \
      [--tfds_data_dir=D] [--features=caption=captions/text,...]

and pass --config.data.dir=DIR.
"""

import argparse
import dataclasses
import os

import numpy as np

from cmal_jax import cli_errors
from cmal_jax.data import pair_source
from cmal_jax.data import records
from cmal_jax.data.shapes import Shapes, check_feature_dim

PREFIX = 'tfds:'
# The fields a dataset may lack (mapped to '' in data.tfds_features).
OPTIONAL_FIELDS = ('image_id', 'region_tags', 'region_conf')
# tfds.features.BBoxFeature's (ymin, xmin, ymax, xmax) -> (x1, y1, x2, y2).
YXYX_TO_XYXY = [1, 0, 3, 2]
# Shapes of a field whose Sequence feature decoded to [] (no regions).
EMPTY_SHAPES = {'region_feats': (0, 0), 'region_boxes': (0, 4),
                'region_conf': (0,)}


# ------------------------------------------------------------------ config

@dataclasses.dataclass(frozen=True)
class TfdsSpec:
  """A parsed data.source: 'tfds:NAME[:CONFIG][/SPLIT]'."""
  name: str
  config: str = ''  # '' = the builder's default config.
  split: str = ''  # '' = config.data.train_split.

  @property
  def tfds_name(self) -> str:
    """The name tfds.data_source takes: 'NAME' or 'NAME/CONFIG'."""
    return f'{self.name}/{self.config}' if self.config else self.name

  def label(self, split: str) -> str:
    """How errors name one split: 'tfds:NAME[:CONFIG]/SPLIT'."""
    config = f':{self.config}' if self.config else ''
    return f'{PREFIX}{self.name}{config}/{split}'


def parse_source(source: str) -> TfdsSpec:
  """'tfds:NAME[:CONFIG][/SPLIT]' -> TfdsSpec; ValueError naming the field."""
  dataset, slash, split = source[len(PREFIX):].partition('/')
  name, _, config = dataset.partition(':')
  if (not source.startswith(PREFIX) or not name or ':' in config
      or (slash and not split)):
    raise ValueError(f"config.data.source={source!r}: expected '' (records "
                     "in data.dir) or 'tfds:NAME[:CONFIG][/SPLIT]'")
  return TfdsSpec(name, config, split)


def source_spec(config) -> TfdsSpec | None:
  """config.data.source parsed; None for '' (records in data.dir). Configs
  without the field (fine-tuning's) read records."""
  source = config.data.get('source', '')
  return parse_source(source) if source else None


def feature_paths(given, where='config.data.tfds_features') -> dict[str, str]:
  """{our field: path into the TFDS example}: `given` (a dict or ConfigDict,
  e.g. data.tfds_features) over the defaults, our own names."""
  given = given.to_dict() if hasattr(given, 'to_dict') else dict(given or {})
  unknown = sorted(set(given) - set(records.PAIR_FIELDS))
  if unknown:
    raise ValueError(f'{where}: unknown fields {unknown}; ours are '
                     f'{list(records.PAIR_FIELDS)}')
  paths = {field: given.get(field, field) for field in records.PAIR_FIELDS}
  for field, path in paths.items():
    if not path and field not in OPTIONAL_FIELDS:
      raise ValueError(f"{where}: {field}='' but it is required; only "
                       f'{list(OPTIONAL_FIELDS)} may be absent')
  return paths


# --------------------------------------------------------- TFDS features

def _tfds():
  """tensorflow_datasets, imported on first use: runs on records never pay
  for it (~0.5 s)."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError('config.data.source=tfds:... needs tensorflow-datasets '
                      '(pip install -r requirements.txt)') from e
  return tfds


def _unwrap_sequences(feature):
  """The item feature of (nested) tfds Sequences; the feature itself else."""
  while isinstance(feature, _tfds().features.Sequence):
    feature = feature.feature
  return feature


def leaf_paths(feature, prefix='') -> list[str]:
  """Every '/'-separated path to a non-dict feature, for error messages."""
  feature = _unwrap_sequences(feature)
  if not isinstance(feature, _tfds().features.FeaturesDict):
    return [prefix]
  return [path for key in feature.keys()
          for path in leaf_paths(feature[key], f'{prefix}{key}/')]


def feature_at(features, path: str, *, field: str, label: str):
  """The TFDS feature at `path` (through dicts and Sequences of dicts)."""
  feature = features
  for key in path.split('/'):
    inner = _unwrap_sequences(feature)
    if not (isinstance(inner, _tfds().features.FeaturesDict) and key in inner):
      known = sorted(p.rstrip('/') for p in leaf_paths(features))
      raise ValueError(
          f'{label}: config.data.tfds_features.{field}={path!r}: the dataset '
          f'has no such feature; its features are {known}')
    feature = inner[key]
  return feature


def _value_at(example: dict, path: str):
  """The decoded value at `path` ('/'-separated keys of nested dicts)."""
  for key in path.split('/'):
    example = example[key]
  return example


# ------------------------------------------------------ value conversion

def _as_str(value):
  """A decoded Text (bytes) or integer id -> str; anything else unchanged,
  for validate_pair to name its type."""
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, bytes):
    return value.decode('utf-8')
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    return str(int(value))
  return value


def _stacked(value, field, err):
  """A tensor value as one array. A Sequence feature decodes to a list of
  per-region arrays, [] when there are none."""
  if not isinstance(value, list):
    return np.asarray(value)
  if not value:
    return np.zeros(EMPTY_SHAPES[field], np.float32)
  try:
    return np.stack([np.asarray(v) for v in value])
  except ValueError as e:  # Items of different shapes.
    raise err(field, f'cannot stack its items: {e}') from e


def _first_caption(value, err):
  """A caption, or the first of a sequence of captions."""
  if isinstance(value, (list, np.ndarray)) and np.ndim(value) > 0:
    if len(value) == 0:
      raise err('caption', 'no caption (an empty sequence)')
    value = value[0]
  return _as_str(value)


def _tag_names(value, class_names, err):
  """Tag strings, or ClassLabel ids -> their names (-1 -> "", no tag)."""
  items = value.tolist() if isinstance(value, np.ndarray) else list(value)
  if class_names is None:
    return [_as_str(t) for t in items]
  tags = []
  for i in map(int, items):
    if not -1 <= i < len(class_names):
      raise err('region_tags', f'class id {i} outside the ClassLabel\'s '
                f'{len(class_names)} names')
    tags.append(class_names[i] if i >= 0 else '')
  return tags


# ---------------------------------------------------------------- source

def _open_tfds(spec: TfdsSpec, split: str, data_dir: str | None):
  """tfds.data_source of a prepared dataset, never downloading or building;
  errors say what was looked for where."""
  try:
    return _tfds().data_source(spec.tfds_name, split=split,
                               data_dir=data_dir, download=False)
  except Exception as e:  # TFDS raises many types; its first line says why.
    reason = str(e).strip().split('\n')[0]
    raise ValueError(
        f'{spec.label(split)}: cannot open the prepared TFDS dataset '
        f'{spec.tfds_name!r} (split {split!r}) in '
        f'{data_dir or "the TFDS default data dir"}: {reason} Prepare it in '
        'the ArrayRecord format (tfds build --file_format=array_record '
        '--data_dir=DIR) and set config.data.tfds_data_dir=DIR.') from e


class TfdsPairSource:
  """Grain random-access source of pair records from one TFDS split.

  source[i] is record i as a dict of records.PAIR_FIELDS, validated
  (records.validate_pair: float32 arrays, tag strings); a bad record raises
  a records.RecordError naming `label` ('tfds:NAME/SPLIT'), i and the field.
  """

  def __init__(self, spec: TfdsSpec, split: str, *, feature_dim: int,
               data_dir: str | None = None,
               features: dict[str, str] | None = None):
    self.label = spec.label(split)
    self.feature_dim = feature_dim
    self.paths = features or {f: f for f in records.PAIR_FIELDS}
    self._source = _open_tfds(spec, split, data_dir or None)
    spec_features = self._source.dataset_info.features
    # The feature each mapped path names, checked now rather than per record.
    self.field_features = {
        field: feature_at(spec_features, path, field=field, label=self.label)
        for field, path in self.paths.items() if path}
    self.class_names = self._tag_class_names()
    self.boxes_are_yxyx = self._boxes_are_bbox_features()

  def _tag_class_names(self):
    """The names of a ClassLabel tag feature; None for string tags."""
    tags = self.field_features.get('region_tags')
    item = _unwrap_sequences(tags) if tags is not None else None
    return (list(item.names) if isinstance(item, _tfds().features.ClassLabel)
            else None)

  def _boxes_are_bbox_features(self):
    """Whether the boxes are tfds BBoxFeatures, (ymin, xmin, ymax, xmax)."""
    return isinstance(_unwrap_sequences(self.field_features['region_boxes']),
                      _tfds().features.BBoxFeature)

  def __len__(self):
    return len(self._source)

  def __repr__(self):
    return f'TfdsPairSource({self.label}, {len(self)} records)'

  def read(self, index: int) -> dict:
    """Record `index` converted to our fields, not yet validated."""
    err = lambda field, problem: records.RecordError(
        self.label, index, field, problem)
    try:
      example = self._source[index]
    except Exception as e:  # Any read or decode failure is this record's.
      raise err('*', f'cannot read or decode the TFDS example: {e}') from e
    value = lambda field: _value_at(example, self.paths[field])
    feats = _stacked(value('region_feats'), 'region_feats', err)
    boxes = _stacked(value('region_boxes'), 'region_boxes', err)
    if self.boxes_are_yxyx and boxes.ndim == 2 and boxes.shape[1] == 4:
      boxes = boxes[:, YXYX_TO_XYXY]
    n = len(feats)
    return dict(
        image_id=_as_str(value('image_id')) if self.paths['image_id']
        else str(index),
        caption=_first_caption(value('caption'), err),
        region_feats=feats, region_boxes=boxes,
        region_conf=(_stacked(value('region_conf'), 'region_conf', err)
                     if self.paths['region_conf']
                     else np.ones(n, np.float32)),
        region_tags=(_tag_names(value('region_tags'), self.class_names, err)
                     if self.paths['region_tags'] else [''] * n))

  def __getitem__(self, index) -> dict:
    index = int(index)
    return records.validate_pair(self.read(index), path=self.label,
                                 index=index, feature_dim=self.feature_dim)

  def feature_width(self) -> int | None:
    """F from the region_feats feature's shape, or the first example's
    width; None when neither tells (no regions)."""
    shape = self.field_features['region_feats'].shape
    if shape and isinstance(shape[-1], int):
      return shape[-1]
    if len(self):
      feats = self.read(0)['region_feats']
      if feats.ndim == 2 and len(feats):
        return int(feats.shape[1])
    return None

  def derived_meta(self) -> dict:
    """records.py's meta from the dataset alone (see the module doc)."""
    if self.class_names is None and self.paths['region_tags']:
      raise ValueError(
          f'{self.label}: the tags ({self.paths["region_tags"]!r}) are '
          'strings, so the tag vocabulary cannot be derived: write a '
          'meta.json of the tags found with python -m '
          f'cmal_jax.data.tfds_source --source={self.label} --out=DIR and '
          'set config.data.dir=DIR, or store the tags as a '
          'Sequence(ClassLabel).')
    feature_dim = self.feature_width()
    if feature_dim is None:
      raise ValueError(
          f'{self.label}: cannot tell the region feature width (the feature '
          'has no fixed width and the first example no regions); give it in '
          "config.data.dir's meta.json ('feature_dim').")
    return dict(tags=list(self.class_names or []), synonyms={},
                feature_dim=feature_dim)


# ------------------------------------------------------------ the hook

def tfds_split(config, spec: TfdsSpec, split: str) -> str:
  """The TFDS split our split name reads: data.source's /SPLIT stands for
  data.train_split; every other name is read as it is."""
  if spec.split and split == config.data.train_split:
    return spec.split
  return split


def tfds_meta(config, source: TfdsPairSource, feature_dim: int) -> dict:
  """config.data.dir's meta.json if it has one, else source.derived_meta();
  its feature_dim checked against the config's F."""
  # config.data.dir, not pre-training's `directory`: that defaults to
  # {workdir}/data, which may hold an earlier synthetic run's meta.json.
  meta_dir = config.data.dir
  if meta_dir and os.path.exists(os.path.join(meta_dir, records.META_FILE)):
    meta = records.read_meta(meta_dir)
    check_feature_dim(meta_dir, meta.get('feature_dim'), feature_dim)
    return meta
  meta = source.derived_meta()
  if meta['feature_dim'] != feature_dim:
    raise ValueError(
        f'{source.label}: feature_dim={meta["feature_dim"]} (derived from '
        f'the dataset) does not match config model.region_feat_dim='
        f'{feature_dim}.')
  return meta


def open_pairs(config, directory: str, split: str):
  """The pre-training pairs of one split, from where config.data.source says.

  Returns (source, name, meta): a random-access source whose items
  pipeline.decode_pair takes (`directory`'s ArrayRecord file: pair record
  bytes, or caption records joined with the folder's store by
  pair_source.JoinedPairs; or TfdsPairSource's validated dicts), the name
  errors give it, and
  the dataset's meta (tags, synonyms, feature_dim), its feature_dim checked
  against the config's.
  """
  shapes = Shapes.from_config(config)
  spec = source_spec(config)
  if spec is None:  # Records in `directory`, by reference or copied.
    meta = records.read_meta(directory)
    check_feature_dim(directory, meta.get('feature_dim'), shapes.feature_dim)
    source, path = pair_source.open_split(
        directory, split, pixels=shapes.pixels,
        feature_dim=None if shapes.pixels else shapes.feature_dim)
    return source, path, meta
  if shapes.pixels:
    raise ValueError(
        f'config.data.source={config.data.source!r}: TFDS datasets feed '
        "region features; a model that reads pixels needs data.source=''.")
  source = TfdsPairSource(
      spec, tfds_split(config, spec, split), feature_dim=shapes.feature_dim,
      data_dir=config.data.get('tfds_data_dir', ''),
      features=feature_paths(config.data.get('tfds_features', None)))
  return source, source.label, tfds_meta(config, source, shapes.feature_dim)


# ------------------------------------------------- meta.json from a scan

def scanned_meta(sources: list[TfdsPairSource]) -> dict:
  """meta.json content from every record of `sources`: the tags found
  (sorted), no synonyms, the feature width, the split sizes."""
  tags, dims, splits = set(), set(), {}
  for source in sources:
    for i in range(len(source)):
      pair = source.read(i)
      tags.update(t for t in pair['region_tags'] if t)
      if pair['region_feats'].ndim == 2 and len(pair['region_feats']):
        dims.add(int(pair['region_feats'].shape[1]))
    splits[source.label.rpartition('/')[2]] = len(source)
  if len(dims) != 1:
    raise ValueError(f'{[s.label for s in sources]}: region feature widths '
                     f'{sorted(dims)}; expected exactly one')
  return dict(tags=sorted(tags), synonyms={}, feature_dim=dims.pop(),
              splits=splits)


def parse_features_flag(text: str) -> dict[str, str]:
  """'caption=captions/text,region_tags=' -> {field: path}."""
  pairs = [item.split('=', 1) for item in text.split(',') if item]
  if any(len(p) != 2 for p in pairs):
    raise ValueError(f'--features={text!r}: expected field=path,...')
  return dict(pairs)


def main(argv=None):
  """Writes meta.json for a TFDS dataset from its tags; returns the meta."""
  ap = argparse.ArgumentParser(description='Writes DIR/meta.json (tags, '
                               'feature_dim) for data.source=tfds:...')
  ap.add_argument('--source', required=True,
                  help='tfds:NAME[:CONFIG]/SPLIT, as in config.data.source.')
  ap.add_argument('--out', required=True,
                  help='The folder for meta.json (then config.data.dir).')
  ap.add_argument('--splits', default='',
                  help='Comma-separated splits to scan (default: SPLIT).')
  ap.add_argument('--tfds_data_dir', default='',
                  help='As config.data.tfds_data_dir.')
  ap.add_argument('--features', default='',
                  help='As config.data.tfds_features: field=path,...')
  cli_errors.add_verbose_flag(ap)
  a = ap.parse_args(argv)
  spec = parse_source(a.source)
  splits = [s for s in a.splits.split(',') if s] or [spec.split]
  if not all(splits):
    ap.error('give the split to scan: --source=tfds:NAME/SPLIT or --splits')
  paths = feature_paths(parse_features_flag(a.features), '--features')
  # Reading needs no feature width: read() does not validate.
  sources = [TfdsPairSource(spec, s, feature_dim=0, features=paths,
                            data_dir=a.tfds_data_dir) for s in splits]
  meta = records.write_meta(a.out, dict(scanned_meta(sources),
                                        source=a.source))
  print(f'Wrote {os.path.join(a.out, records.META_FILE)}: '
        f'{len(meta["tags"])} tags, feature_dim {meta["feature_dim"]}, '
        f'splits {meta["splits"]}')
  return meta


if __name__ == '__main__':
  cli_errors.run_tool('tfds_source', main)
