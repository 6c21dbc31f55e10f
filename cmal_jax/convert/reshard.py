r"""Reshards a dataset folder by image: the layout that
config.data.read='own_shards' reads (cmal_jax/data/shards.py).

  python -m cmal_jax.convert shard --in=DIR --out=DIR \
      (--shards=N | --shard_bytes=B [--multiple_of=M]) \
      [--splits=pretrain] [--whole_splits=val] [--skip_bad]

writes into the fresh folder --out:
  regions-0000k-of-0000N.array_record (+ index)   store shard k
  {split}-0000k-of-0000N.array_record             caption shard k of each
                                                  --splits split: its
                                                  records naming images
                                                  of store shard k
  {split}.array_record, regions.array_record      each --whole_splits split
                                                  copied as it is, and a
                                                  store of the images its
                                                  caption records name
  meta.json                                       the input's, its splits'
                                                  counts and "shards"

The input's store is its region store (or, without one, images.json: the
image files are then packed into the shards, records with the encoded
image). Images are assigned in the order of a stable hash of their id, cut
into N contiguous blocks of balanced bytes (shards.shard_order_key): every
shard is a uniform sample of the images whatever order the store was
written in (COCO then VG, say), so the processes' local streams are alike
and their shards hold about as many pairs. --shard_bytes=B picks the
smallest N (a multiple of M) whose store shards each hold at most B bytes
of records (encoded, as written; each file adds ArrayRecord's framing,
under 1% plus 64 KiB blocks).

Streaming: the store is read twice, record by record (once to check and
measure each record, once per shard to write it); what is held is each
image's id, record index, size and shard. Caption records are copied as
their bytes, up to MAX_OPEN_WRITERS shard files open at a time (more
shards: another pass over the split). Every file is written to a temporary
name and renamed when complete, and meta.json comes last: a folder without
it is an interrupted conversion.

Pair records that carry their image's features are refused in a split to
shard (their visual side is not in the store; write caption records with
`convert captions`), and copied as they are in a whole split. Bad input (a
record that does not decode or validate, a duplicate image id, a caption
record of an image the store lacks) raises a RecordError naming file,
record and field; with skip_bad it is left out and counted per field.
"""

import dataclasses
import os

from cmal_jax.convert.formats import Collector
from cmal_jax.data import image_store, pair_source, records, region_store
from cmal_jax.data import shards

MAX_OPEN_WRITERS = 256
DEFAULT_SPLITS = ('pretrain',)
DEFAULT_WHOLE_SPLIT = 'val'  # Kept whole when the input has it.


@dataclasses.dataclass
class Resharded:
  """What reshard_folder wrote: per shard, its images, its store bytes and
  its caption records per split; per whole split its records; the store's
  images left out; and the records skipped per field."""
  images: list[int]
  bytes: list[int]
  pairs: dict[str, list[int]]
  whole: dict[str, int]
  unused: int  # Store images no caption of these splits names: left out.
  skipped: dict[str, int]

  def describe(self, out_dir: str) -> str:
    """What the summary line says was written (after 'Wrote N images')."""
    text = (f'images into {len(self.images)} shards of {out_dir} (store '
            f'shards {min(self.bytes)}-{max(self.bytes)} bytes of records')
    for split, counts in self.pairs.items():
      text += f'; {split}: {sum(counts)} caption records'
    for split, n in self.whole.items():
      text += f'; {split} kept whole: {n} records'
    if self.unused:
      text += f'; {self.unused} store images no caption names left out'
    return text + ')'


def parse_bytes(text: str) -> int:
  """'2G' -> 2 * 1024**3 (K, M, G, T: powers of 1024); plain digits as
  they are."""
  units = {'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30, 'T': 1 << 40}
  text = text.strip().upper().removesuffix('B')
  scale = units.get(text[-1:], 1)
  number = text[:-1] if text[-1:] in units else text
  try:
    value = int(float(number) * scale)
  except ValueError:
    raise ValueError(f'--shard_bytes={text!r}: expected a byte count such '
                     'as 2000000000 or 2G') from None
  if value <= 0:
    raise ValueError(f'--shard_bytes={text!r}: must be > 0')
  return value


class StoreRecords:
  """A folder's store, image by image as a store shard keeps it: its
  region store, or (without one) its images.json with each image file's
  bytes in the record."""

  def __init__(self, directory: str, feature_dim: int | None):
    self.feature_dim = feature_dim
    regions = region_store.store_path(directory)
    if os.path.exists(regions):
      self._regions = region_store.RegionStore(regions, feature_dim)
      self._source = records.open_source(regions)
      self.path = regions
      self.image_ids = sorted(self._regions.image_ids(),
                              key=self._regions.record_index)
      self.position = self._regions.record_index
    elif os.path.isfile(image_store.store_file(directory)):
      self._regions = None
      self._images = image_store.ImageStore(image_store.store_file(directory))
      self.path = self._images.path
      self.image_ids = self._images.image_ids()
      self.position = {i: k for k, i in enumerate(self.image_ids)}.get
    else:
      raise FileNotFoundError(
          f'{directory}: no store to shard: neither '
          f'{region_store.REGION_STORE_FILE} nor {image_store.IMAGE_STORE_FILE}')

  def read(self, image_id: str) -> dict:
    """The image's record, checked (a RecordError names the store, the
    record and the field); float16 region_feats stay float16."""
    index = self.position(image_id)
    if self._regions is not None:
      given = records.decode_record_at(self._source[index], self.path, index)
    else:
      try:
        given = self._images.encoded(image_id)
      except image_store.ImageError as e:
        raise records.RecordError(self.path, index, records.IMAGE_FIELD,
                                  str(e)) from e
    record = region_store.stored_record(given, path=self.path, index=index,
                                        feature_dim=self.feature_dim)
    return region_store.check_indexed_id(record, image_id, path=self.path,
                                         index=index)


def _bad(collector: Collector, error: records.RecordError):
  """Raises `error`, or (skip_bad) counts it under its field."""
  if collector.on_error == 'raise':
    raise error
  collector.count('record' if error.field == '*' else error.field)


def named_images(directory: str, split_names) -> set[str]:
  """The image ids the caption records of these splits name (records that
  do not decode are left to the pass that copies them, which names them)."""
  named = set()
  for split in split_names:
    path = records.split_path(directory, split)
    source = records.open_source(path)
    for i in range(len(source)):
      try:
        record = records.decode_record_at(source[i], path, i)
      except records.RecordError:
        continue
      if (pair_source.is_caption_record(record)
          and isinstance(record.get('image_id'), str)):
        named.add(record['image_id'])
  return named


def measure_store(store: StoreRecords, wanted: set[str],
                  collector: Collector) -> dict[str, int]:
  """{image_id: bytes as written} of the store's good records of the
  `wanted` images, each read once, in record order."""
  size = {}
  for image_id in store.image_ids:
    if image_id not in wanted:
      continue
    try:
      size[image_id] = len(records.encode_record(store.read(image_id)))
    except records.RecordError as e:
      _bad(collector, e)
  return size


def assign_shards(order: list[str], size: dict[str, int], num_shards: int
                  ) -> dict[str, int]:
  """{image_id: shard}: the images of `order` cut into num_shards
  contiguous blocks of balanced bytes, an image going to the block its
  bytes' midpoint falls in (so a block holds total / N bytes, give or take
  one image)."""
  total, done, shard_of = sum(size[i] for i in order), 0, {}
  for image_id in order:
    s = size[image_id]
    shard_of[image_id] = min(num_shards - 1,
                             (2 * done + s) * num_shards // (2 * total))
    done += s
  return shard_of


def shard_bytes_of(shard_of: dict[str, int], size: dict[str, int],
                   num_shards: int) -> list[int]:
  per = [0] * num_shards
  for image_id, k in shard_of.items():
    per[k] += size[image_id]
  return per


def plan_shards(size: dict[str, int], *, shards_wanted: int | None,
                shard_bytes: int | None, multiple_of: int = 1
                ) -> dict[str, int]:
  """{image_id: shard} for num_shards, or for the smallest multiple of
  multiple_of whose shards each hold at most shard_bytes. Refuses an
  image bigger than the bound and a plan that leaves a shard empty."""
  if not size:
    raise ValueError('no image to shard (every store record was skipped)')
  order = sorted(size, key=shards.shard_order_key)
  if shards_wanted is not None:
    n = shards_wanted
    shard_of = assign_shards(order, size, n)
  else:
    biggest = max(size, key=size.get)
    if size[biggest] > shard_bytes:
      raise ValueError(
          f'--shard_bytes={shard_bytes}: image {biggest!r} alone takes '
          f'{size[biggest]} bytes; raise the bound')
    n = -(-sum(size.values()) // shard_bytes)
    n = -(-n // multiple_of) * multiple_of
    while True:  # Ends: at most one image a shard fits.
      shard_of = assign_shards(order, size, n)
      if max(shard_bytes_of(shard_of, size, n)) <= shard_bytes:
        break
      n += multiple_of
  images = [0] * n
  for k in shard_of.values():
    images[k] += 1
  if 0 in images:
    raise ValueError(
        f'{n} shards for {len(size)} images would leave shard '
        f'{images.index(0)} empty: use fewer shards (or a larger '
        '--shard_bytes)')
  return shard_of


def caption_shard(raw, path: str, index: int, shard_of: dict[str, int],
                  store_path: str) -> int:
  """The shard of a split's record: its image's; RecordError naming the
  record for a pair record, a bad caption record or an unknown image."""
  record = records.decode_record_at(raw, path, index)
  if not isinstance(record, dict):
    raise records.RecordError(path, index, '*', 'record is not a dict')
  if not pair_source.is_caption_record(record):
    field = ('region_feats' if 'region_feats' in record
             else records.IMAGE_FIELD)
    raise records.RecordError(
        path, index, field, "a pair record, which carries its image's "
        'features: convert shard moves caption records {image_id, caption} '
        'to the shard of their image; write those with python -m '
        'cmal_jax.convert captions (without --copy_features)')
  pair_source.check_caption_record(record, path=path, index=index)
  image_id = record['image_id']
  if image_id not in shard_of:
    raise records.RecordError(path, index, 'image_id',
                              f'image {image_id!r} is not in {store_path} '
                              '(or its record was skipped)')
  return shard_of[image_id]


def write_caption_shards(in_dir: str, out_dir: str, split: str,
                         shard_of: dict[str, int], num_shards: int,
                         store_path: str, collector: Collector) -> list[int]:
  """Writes each record of in_dir's split, as its bytes, into the caption
  shard of its image; returns the records per shard. Bad records are
  raised or counted (once: on the first pass)."""
  path = records.split_path(in_dir, split)
  source = records.open_source(path)
  counts = [0] * num_shards
  for first in range(0, num_shards, MAX_OPEN_WRITERS):
    writers = {k: records.AtomicRecordWriter(
        shards.split_shard_path(out_dir, split, k, num_shards))
               for k in range(first, min(num_shards,
                                         first + MAX_OPEN_WRITERS))}
    try:
      for i in range(len(source)):
        try:
          raw = source[i]
          k = caption_shard(raw, path, i, shard_of, store_path)
        except records.RecordError as e:
          if first == 0:
            _bad(collector, e)
          continue
        if k in writers:
          writers[k].write(raw)
    except BaseException:
      for writer in writers.values():
        writer.abort()
      raise
    for k, writer in writers.items():
      counts[k] = writer.commit()
  return counts


def copy_whole_split(in_dir: str, out_dir: str, split: str,
                     good: set[str], store_path: str,
                     collector: Collector) -> tuple[int, set[str]]:
  """Copies in_dir's split as it is (its bad caption records raised or
  counted; `good`: the images that can be read); returns (records
  written, the image ids its caption records name)."""
  path = records.split_path(in_dir, split)
  source = records.open_source(path)
  named = set()

  def kept():
    for i in range(len(source)):
      try:
        raw = source[i]
        record = records.decode_record_at(raw, path, i)
        if pair_source.is_caption_record(record):
          pair_source.check_caption_record(record, path=path, index=i)
          if record['image_id'] not in good:
            raise records.RecordError(
                path, i, 'image_id', f'image {record["image_id"]!r} is not '
                f'in {store_path} (or its record was skipped)')
          named.add(record['image_id'])
      except records.RecordError as e:
        _bad(collector, e)
        continue
      yield raw

  n = records.write_records(records.split_path(out_dir, split), kept())
  return n, named


def _check_folders(in_dir: str, out_dir: str, meta: dict):
  if os.path.abspath(in_dir) == os.path.abspath(out_dir):
    raise ValueError(f'--out={out_dir} is --in: write the sharded folder '
                     'into a fresh one')
  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise FileExistsError(f'--out={out_dir}: not empty; write the sharded '
                          'folder into a fresh one')
  if 'shards' in meta:
    raise ValueError(f'{in_dir}: already sharded ({records.META_FILE} '
                     f'shards count {meta["shards"].get("count")}); reshard '
                     'the unsharded folder it was written from')


def reshard_folder(in_dir: str, out_dir: str, *, shards_wanted=None,
                   shard_bytes=None, multiple_of: int = 1, splits=None,
                   whole_splits=None, skip_bad: bool = False) -> Resharded:
  """Writes in_dir sharded by image into out_dir (module docstring).

  shards_wanted=N, or shard_bytes=B (N: the smallest multiple of
  multiple_of whose store shards hold <= B bytes each). splits: the splits
  to shard (default DEFAULT_SPLITS); whole_splits: those copied whole
  (default: DEFAULT_WHOLE_SPLIT if in_dir has it).
  """
  if (shards_wanted is None) == (shard_bytes is None):
    raise ValueError('give one of --shards=N and --shard_bytes=B')
  if shards_wanted is not None and (shards_wanted <= 0 or multiple_of != 1):
    raise ValueError(f'--shards={shards_wanted}: must be > 0 (and '
                     '--multiple_of goes with --shard_bytes only)')
  if multiple_of <= 0:
    raise ValueError(f'--multiple_of={multiple_of}: must be > 0')
  meta = records.read_meta(in_dir)
  _check_folders(in_dir, out_dir, meta)
  splits = list(DEFAULT_SPLITS if splits is None else splits)
  if whole_splits is None:
    whole_splits = [DEFAULT_WHOLE_SPLIT] if os.path.exists(
        records.split_path(in_dir, DEFAULT_WHOLE_SPLIT)) else []
  both = sorted(set(splits) & set(whole_splits))
  if both or not splits:
    raise ValueError(f'--splits={",".join(splits)} and --whole_splits='
                     f'{",".join(whole_splits)}: give at least one split to '
                     f'shard, and none in both {both}')
  for split in splits + list(whole_splits):  # Named before the long part.
    records.open_source(records.split_path(in_dir, split))
  collector = Collector('skip' if skip_bad else 'raise')
  store = StoreRecords(in_dir, meta.get('feature_dim'))
  # Only the images a caption names are written: the shards those of the
  # sharded splits, the whole store those of the whole splits.
  sharded, kept_whole = (named_images(in_dir, splits),
                         named_images(in_dir, whole_splits))
  size = measure_store(store, sharded | kept_whole, collector)
  shard_of = plan_shards({i: size[i] for i in sharded if i in size},
                         shards_wanted=shards_wanted,
                         shard_bytes=shard_bytes, multiple_of=multiple_of)
  n = max(shard_of.values()) + 1
  members = [[] for _ in range(n)]
  for image_id in store.image_ids:  # Record order.
    if image_id in shard_of:
      members[shard_of[image_id]].append(image_id)
  for k, image_ids in enumerate(members):
    region_store.write_region_store(
        shards.store_shard_path(out_dir, k, n),
        (store.read(i) for i in image_ids), store.feature_dim)
  pairs = {split: write_caption_shards(in_dir, out_dir, split, shard_of, n,
                                       store.path, collector)
           for split in splits}
  whole, named = {}, set()
  for split in whole_splits:
    whole[split], more = copy_whole_split(in_dir, out_dir, split, set(size),
                                          store.path, collector)
    named |= more
  if named:
    region_store.write_region_store(
        region_store.store_path(out_dir),
        (store.read(i) for i in store.image_ids if i in named),
        store.feature_dim)
  unused = len(set(store.image_ids) - sharded - kept_whole)
  result = Resharded(images=[len(m) for m in members],
                     bytes=shard_bytes_of(shard_of, size, n), pairs=pairs,
                     whole=whole, unused=unused,
                     skipped=dict(collector.skipped))
  out_meta = {k: v for k, v in meta.items() if k not in ('splits', 'shards')}
  out_meta['splits'] = {**{s: sum(c) for s, c in pairs.items()}, **whole}
  whole_files = [os.path.basename(records.split_path(out_dir, split))
                 for split in whole]
  if named:
    whole_files += [region_store.REGION_STORE_FILE, os.path.basename(
        region_store.index_path(region_store.store_path(out_dir)))]
  out_meta['shards'] = dict(count=n, images=result.images,
                            bytes=result.bytes, splits=pairs,
                            whole_files=whole_files)
  records.write_meta(out_dir, out_meta)  # Last: the folder is complete.
  return result
