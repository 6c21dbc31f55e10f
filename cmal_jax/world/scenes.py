r"""A synthetic grounded world: scenes, a simulated detector, captions.

Example i of a split depends only on (seed, split, i): its generator is
`np.random.default_rng([seed, split_id(split), i])`, so any subset of a
split can be made in any order, in any process, with identical bytes.

  python -m cmal_jax.world.scenes --out=/tmp/world --split=pretrain --num=20000

writes each scene's detected regions into the region store
`/tmp/world/regions.array_record` (added to the images already there), its
caption into `/tmp/world/pretrain.array_record` as a caption record naming
the image (data/pair_source.py joins them when read), `/tmp/world/meta.json`
and a few PNG previews in `/tmp/world/previews/` (see records.py for the
schema). With --images (WorldParams.images) each region record also carries
its scene as PNG bytes (`image`), for a model that reads pixels; the region
features stay, so one world serves both kinds of model.
"""

import argparse
import dataclasses
import functools
import os
import time
import zlib

import numpy as np

from cmal_jax import cli_errors
from cmal_jax.model.pixels import reads_pixels
from cmal_jax.data import image_store, records, region_store

# --------------------------------------------------------------- vocabulary

WORLD_TAGS = ('circle', 'square', 'triangle', 'star', 'cross', 'diamond',
              'hexagon', 'ring', 'heart', 'half circle')
# Words a caption may use for each tag. Singular only: plurals are made
# with regular English rules (+s, or +es after s/x/z/ch/sh).
_NOUNS = {
    'circle': ('circle', 'disc', 'ball'),
    'square': ('square', 'box', 'block'),
    'triangle': ('triangle',),
    'star': ('star',),
    'cross': ('cross', 'plus'),
    'diamond': ('diamond', 'rhombus'),
    'hexagon': ('hexagon',),
    'ring': ('ring', 'donut'),
    'heart': ('heart',),
    'half circle': ('half circle', 'semicircle'),
}
WORLD_SYNONYMS = {w: tag for tag, words in _NOUNS.items() for w in words}

COLOURS = {  # Distinct, saturated; the background is dull (see _background).
    'red': (220, 40, 40), 'green': (40, 180, 60), 'blue': (50, 80, 230),
    'yellow': (240, 220, 40), 'purple': (150, 60, 200),
    'orange': (250, 140, 20), 'white': (245, 245, 245),
    'cyan': (40, 220, 230),
}
SIZES = ('small', 'large')


@dataclasses.dataclass(frozen=True)
class WorldParams:
  """Everything that shapes the world; stored in meta.json['generator']."""
  image_size: int = 64
  feature_dim: int = 256
  min_objects: int = 1
  max_objects: int = 6
  small_radius: tuple[float, float] = (0.09, 0.11)  # Fraction of image size.
  large_radius: tuple[float, float] = (0.15, 0.20)
  max_occlusion: float = 0.2     # Max fraction of an object hidden by others.
  # Simulated detector.
  wrong_tag_prob: float = 0.05   # A detected object gets another tag.
  miss_prob: float = 0.05        # An object is not detected (may be named).
  max_background: int = 2        # 0..max_background untagged regions.
  box_pad: int = 2               # Pixels of context around an object's box.
  box_jitter: int = 1            # +- pixels of noise on each box side.
  max_regions: int = 8
  # Each record also carries its scene as PNG bytes (`image`), for a model
  # that reads pixels (model.visual.input='pixels').
  images: bool = False

  @classmethod
  def from_config(cls, config):
    """The world of a run config (config.world, model.region_feat_dim; with
    model.visual.input='pixels', the images too)."""
    w = config.world
    return cls(image_size=w.image_size,
               feature_dim=config.model.region_feat_dim,
               wrong_tag_prob=w.wrong_tag_prob, miss_prob=w.miss_prob,
               max_background=w.max_background, images=reads_pixels(config))


@dataclasses.dataclass
class Object:
  shape: str                  # One of WORLD_TAGS.
  colour: str                 # One of COLOURS.
  size: str                   # 'small' or 'large'.
  box: tuple[int, int, int, int]  # Pixel box (x1, y1, x2, y2), x2 exclusive.
  center: tuple[float, float]     # Pixel (x, y).


@dataclasses.dataclass
class Scene:
  image: np.ndarray           # uint8 [H, W, 3].
  objects: list[Object]       # Drawing order: later ones are on top.


def split_id(split: str) -> int:
  """Stable id of a split name: disjoint random streams per split."""
  return zlib.crc32(split.encode('utf-8'))


# ------------------------------------------------------------------ drawing

def _convex(u, v, verts):
  """Inside test for a convex polygon given counter-clockwise in (u, v)."""
  inside = np.ones(u.shape, bool)
  for (ax, ay), (bx, by) in zip(verts, verts[1:] + verts[:1]):
    inside &= (bx - ax) * (v - ay) - (by - ay) * (u - ax) >= 0
  return inside


def _regular(n, start):
  a = start + 2 * np.pi * np.arange(n) / n
  return [(float(np.cos(t)), float(np.sin(t))) for t in a]


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Mask of `shape` on coordinates u, v (unit radius, v points down)."""
  rho = np.hypot(u, v)
  if shape == 'circle':
    return rho <= 1
  if shape == 'square':
    return (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
  if shape == 'triangle':  # Apex up (v down), centred on its bounding box.
    return _convex(u, v - 0.25, _regular(3, -np.pi / 2))
  if shape == 'star':
    sector = 2 * np.pi / 5
    t = np.mod(np.arctan2(v, u) + np.pi / 2, sector) / sector
    return rho <= 1 - 0.58 * (1 - np.abs(2 * t - 1))
  if shape == 'cross':
    a, b = np.abs(u), np.abs(v)
    return ((a <= 0.3) & (b <= 0.9)) | ((b <= 0.3) & (a <= 0.9))
  if shape == 'diamond':
    return np.abs(u) / 0.8 + np.abs(v) <= 1
  if shape == 'hexagon':
    return _convex(u, v, _regular(6, 0.0))
  if shape == 'ring':
    return (rho <= 1) & (rho >= 0.55)
  if shape == 'heart':
    x, y = 1.15 * u, -1.15 * v + 0.12
    return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
  if shape == 'half circle':  # Flat side down.
    w = v - 0.4
    return (u * u + w * w <= 1) & (w <= 0)
  raise ValueError(f'unknown shape {shape!r}; known: {WORLD_TAGS}')


def _background(rng, size):
  """Dull base colour + low-amplitude stripes/checker + noise. float [S,S,3]."""
  grey = rng.uniform(60, 130)
  base = 0.6 * grey + 0.4 * rng.uniform(50, 140, size=3)
  y, x = np.mgrid[0:size, 0:size].astype(np.float32)
  kind = rng.integers(3)
  if kind == 0:  # Stripes in a random direction.
    a = rng.uniform(0, np.pi)
    f = rng.uniform(0.25, 0.8)
    pattern = np.sin(f * (x * np.cos(a) + y * np.sin(a)))
  elif kind == 1:  # Checker.
    c = rng.integers(4, 11)
    pattern = 2.0 * (((x // c) + (y // c)) % 2) - 1
  else:
    pattern = np.zeros_like(x)
  amp = rng.uniform(6, 16)
  img = base + amp * pattern[..., None]
  return img + rng.normal(0, rng.uniform(2, 6), (size, size, 3))


def sample_scene(rng: np.random.Generator, params: WorldParams) -> Scene:
  """Draws 1..max_objects non-occluding objects on a textured background."""
  s = params.image_size
  if s < 32:
    raise ValueError(f'image_size must be >= 32, got {s}')
  img = _background(rng, s)
  owner = np.full((s, s), -1, np.int32)  # Which object is on top per pixel.
  areas, objects = [], []
  want = int(rng.integers(params.min_objects, params.max_objects + 1))
  for _ in range(want):
    shape = WORLD_TAGS[rng.integers(len(WORLD_TAGS))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    size = SIZES[rng.integers(2)]
    lo, hi = params.small_radius if size == 'small' else params.large_radius
    r = rng.uniform(lo, hi) * s
    rot = rng.uniform(-0.2, 0.2)
    margin = r + params.box_pad + 1  # Keep context inside the image.
    for _ in range(30):  # Rejection sampling of a position.
      cx, cy = rng.uniform(margin, s - margin, size=2)
      x0, y0 = int(cx - r - 1), int(cy - r - 1)
      x1, y1 = int(cx + r + 2), int(cy + r + 2)
      yy, xx = np.mgrid[y0:y1, x0:x1] + 0.5
      u, v = (xx - cx) / r, (yy - cy) / r
      c, sn = np.cos(rot), np.sin(rot)
      m = shape_mask(shape, c * u + sn * v, -sn * u + c * v)
      if not m.any():
        continue
      under = owner[y0:y1, x0:x1][m]
      hidden = np.bincount(under[under >= 0], minlength=len(objects))
      if all(h <= params.max_occlusion * a for h, a in zip(hidden, areas)):
        break
    else:
      continue  # No room: the scene gets fewer objects.
    rgb = np.array(COLOURS[colour], np.float32) + rng.uniform(-12, 12, 3)
    patch = img[y0:y1, x0:x1]
    patch[m] = rgb + rng.normal(0, 4, (int(m.sum()), 3))
    owner[y0:y1, x0:x1][m] = len(objects)
    areas.append(int(m.sum()))
    ys, xs = np.nonzero(m)
    box = (x0 + int(xs.min()), y0 + int(ys.min()),
           x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)
    objects.append(Object(shape, colour, size, box, (float(cx), float(cy))))
  return Scene(np.clip(img, 0, 255).astype(np.uint8), objects)


# ----------------------------------------------------------------- features

_CROP = 16          # Regions are resampled to 16x16 before description.
_PROJ_SEED = 20221010  # Fixed extractor weights: NOT the world seed.
_BASE_DIM = 3 + 3 + 1 + 3 + 27 + 64 + 128


@functools.lru_cache(maxsize=8)
def _projection(feature_dim):
  rng = np.random.default_rng(_PROJ_SEED)
  if feature_dim >= _BASE_DIM:
    extra = feature_dim - _BASE_DIM
    return (rng.standard_normal((_BASE_DIM, extra)) /
            np.sqrt(_BASE_DIM)).astype(np.float32)
  q, _ = np.linalg.qr(rng.standard_normal((_BASE_DIM, feature_dim)))
  return (q * np.sqrt(_BASE_DIM / feature_dim)).astype(np.float32)


def _crops(image, boxes):
  """Nearest-neighbour resample of each box to [N, 16, 16, 3] in [0, 1]."""
  h, w = image.shape[:2]
  px = np.round(boxes * np.array([w, h, w, h])).astype(np.int64)
  x1, y1 = px[:, 0], px[:, 1]
  x2 = np.maximum(px[:, 2], x1 + 1)
  y2 = np.maximum(px[:, 3], y1 + 1)
  t = (np.arange(_CROP) + 0.5) / _CROP
  xs = np.minimum(x1[:, None] + (t * (x2 - x1)[:, None]).astype(int), w - 1)
  ys = np.minimum(y1[:, None] + (t * (y2 - y1)[:, None]).astype(int), h - 1)
  return image[ys[:, :, None], xs[:, None, :]].astype(np.float32) / 255.0


def extract_region_features(image: np.ndarray, boxes: np.ndarray,
                            feature_dim: int) -> np.ndarray:
  """Fixed pixel descriptor of each box: uint8 [H,W,3], [N,4] -> f32 [N,F].

  Only the pixels inside each box are used. Blocks: colour mean/std,
  foreground (pixels unlike the box border) fraction, mean colour and 27-bin
  colour histogram, 8x8 foreground mask, 4x4x8 gradient-orientation
  histogram (HOG-like); then a fixed random ReLU projection fills up to
  feature_dim. Every block is scaled to roughly unit RMS.
  """
  if feature_dim < 64:
    raise ValueError(f'feature_dim must be >= 64, got {feature_dim}')
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  n = len(boxes)
  if n == 0:
    return np.zeros((0, feature_dim), np.float32)
  c = _crops(image, boxes)                                   # [N,16,16,3]
  flat = c.reshape(n, -1, 3)
  ring = np.concatenate([c[:, 0], c[:, -1], c[:, 1:-1, 0], c[:, 1:-1, -1]], 1)
  bg = np.median(ring, axis=1)                               # [N,3]
  fg = (np.linalg.norm(c - bg[:, None, None], axis=-1) > 0.15)  # [N,16,16]
  fgf = fg.reshape(n, -1).astype(np.float32)
  cnt = fgf.sum(1, keepdims=True)
  w = np.where(cnt > 0, fgf / np.maximum(cnt, 1), 1.0 / fgf.shape[1])
  fg_mean = np.einsum('np,npc->nc', w, flat)
  q = np.minimum((flat * 3).astype(int), 2)                  # 3 levels/chan.
  bins = q[..., 0] * 9 + q[..., 1] * 3 + q[..., 2]
  hist = np.zeros((n, 27), np.float32)
  np.add.at(hist, (np.repeat(np.arange(n), bins.shape[1]), bins.ravel()),
            w.ravel())
  mask8 = fg.reshape(n, 8, 2, 8, 2).mean((2, 4)).reshape(n, 64)
  # HOG: unsigned orientation, 8 bins, 4x4 cells of 4x4 pixels.
  g = np.pad(c.mean(-1), ((0, 0), (1, 1), (1, 1)), mode='edge')
  gx = g[:, 1:-1, 2:] - g[:, 1:-1, :-2]
  gy = g[:, 2:, 1:-1] - g[:, :-2, 1:-1]
  mag = np.hypot(gx, gy)
  ang = np.minimum((np.mod(np.arctan2(gy, gx), np.pi) / np.pi * 8).astype(int),
                   7)
  hog = (np.eye(8, dtype=np.float32)[ang] * mag[..., None])
  hog = hog.reshape(n, 4, 4, 4, 4, 8).sum((2, 4)).reshape(n, 128)
  hog = hog / (np.linalg.norm(hog, axis=1, keepdims=True) + 1e-3) * np.sqrt(128)
  base = np.concatenate([
      (flat.mean(1) - 0.5) * 3.4, flat.std(1) * 6.0,
      (cnt / fgf.shape[1] - 0.5) * 3.4, (fg_mean - 0.5) * 3.4,
      hist * np.sqrt(27), (mask8 - 0.5) * 2, hog], axis=1).astype(np.float32)
  proj = _projection(feature_dim)
  if feature_dim < _BASE_DIM:
    return base @ proj
  extra = np.maximum(base @ proj, 0) * np.sqrt(2)
  return np.concatenate([base, extra], axis=1).astype(np.float32)


# ----------------------------------------------------------------- detector

def detect_regions(scene: Scene, rng: np.random.Generator,
                   params: WorldParams):
  """Simulated detector, sorted by confidence.

  Returns boxes f32 [N,4] (normalised x1,y1,x2,y2), tags list[str] ("" for
  background), conf f32 [N], feats f32 [N, F].
  """
  s = params.image_size
  boxes, tags, conf = [], [], []
  for ob in scene.objects:
    if rng.random() < params.miss_prob:
      continue
    tag, score = ob.shape, rng.uniform(0.6, 1.0)
    if rng.random() < params.wrong_tag_prob:
      others = [t for t in WORLD_TAGS if t != ob.shape]
      tag, score = others[rng.integers(len(others))], rng.uniform(0.3, 0.7)
    pad = params.box_pad + rng.integers(-params.box_jitter,
                                        params.box_jitter + 1, size=4)
    x1, y1, x2, y2 = np.array(ob.box) + pad * np.array([-1, -1, 1, 1])
    x1, y1 = max(x1, 0), max(y1, 0)
    x2, y2 = min(max(x2, x1 + 2), s), min(max(y2, y1 + 2), s)
    boxes.append((x1, y1, x2, y2))
    tags.append(tag)
    conf.append(score)
  for _ in range(int(rng.integers(0, params.max_background + 1))):
    bw, bh = rng.integers(8, max(9, s // 3), size=2)
    for _ in range(20):  # A patch of background, away from the objects.
      x1, y1 = rng.integers(0, s - bw + 1), rng.integers(0, s - bh + 1)
      b = (x1, y1, x1 + bw, y1 + bh)
      if all(_iou(b, ob.box) < 0.1 for ob in scene.objects):
        boxes.append(b)
        tags.append('')
        conf.append(rng.uniform(0.05, 0.3))
        break
  order = np.argsort(-np.array(conf, np.float32), kind='stable')
  order = order[:params.max_regions]
  boxes = np.array(boxes, np.float32).reshape(-1, 4)[order] / s
  conf = np.array(conf, np.float32)[order]
  tags = [tags[i] for i in order]
  feats = extract_region_features(scene.image, boxes, params.feature_dim)
  return boxes, tags, conf, feats


def _iou(a, b):
  iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
  return inter / (area(a) + area(b) - inter)


# ----------------------------------------------------------------- captions

_COUNTS = ('no', 'one', 'two', 'three', 'four', 'five', 'six')
_SIZE_WORDS = {'small': ('small', 'little', 'tiny'), 'large': ('large', 'big')}
_GENERIC = ('shape', 'object', 'thing')  # Nouns that match no tag.


def plural(word: str) -> str:
  """Regular English plural of a noun or of a phrase's last word."""
  head, _, last = word.rpartition(' ')
  last += 'es' if last.endswith(('s', 'x', 'z', 'ch', 'sh')) else 's'
  return f'{head} {last}' if head else last


def _pick(rng, options):
  return options[rng.integers(len(options))]


def _noun(rng, shape):
  words = _NOUNS[shape]  # Canonical half the time, else any synonym.
  return shape if rng.random() < 0.5 else _pick(rng, words)


def _np(rng, colour, shape, n, size=None, generic=False):
  """Noun phrase: 'a small red disc', 'two blue boxes', 'some red things'."""
  noun = _pick(rng, _GENERIC) if generic else _noun(rng, shape)
  adj = colour
  if size and rng.random() < 0.35:
    adj = f'{_pick(rng, _SIZE_WORDS[size])} {adj}'
  if n == 1:
    art = 'an' if adj[0] in 'aeiou' else 'a'
    return f'{art} {adj} {noun}'
  count = 'some' if rng.random() < 0.15 else _COUNTS[n]
  return f'{count} {adj} {plural(noun)}'


def _join(parts):
  if len(parts) == 1:
    return parts[0]
  return ', '.join(parts[:-1]) + ' and ' + parts[-1]


def _groups(objects):
  """(colour, shape) -> objects, in first-appearance order."""
  out = {}
  for ob in objects:
    out.setdefault((ob.colour, ob.shape), []).append(ob)
  return list(out.items())


def _group_np(rng, group):
  (colour, shape), obs = group
  sizes = {o.size for o in obs}
  return _np(rng, colour, shape, len(obs), sizes.pop() if len(sizes) == 1
             else None)


def _relation(a, b, image_size):
  dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
  if np.hypot(dx, dy) < 0.3 * image_size and abs(dx) > abs(dy):
    return 'next to'
  if abs(dx) > abs(dy):
    return 'to the left of' if dx > 0 else 'to the right of'
  return 'above' if dy > 0 else 'below'


def describe(scene: Scene, rng: np.random.Generator) -> str:
  """A caption naming some (not always all) objects, with their colours."""
  groups = _groups(scene.objects)
  order = rng.permutation(len(groups))
  k = len(groups)  # Mention everything, or a random non-empty subset.
  if rng.random() > 0.4:
    k = int(rng.integers(1, len(groups) + 1))
  chosen = [groups[i] for i in order[:k]]
  listed = _join([_group_np(rng, g) for g in chosen])
  outro = _pick(rng, ('', '', ' on a textured background',
                      ' on a patterned background', ' in the picture'))
  template = rng.integers(4)
  if template == 0 and len(groups) >= 2:  # Spatial relation.
    a = groups[order[0]][1][0]
    b = groups[order[1]][1][0]
    rel = _relation(a, b, scene.image.shape[0])
    pa = _np(rng, a.colour, a.shape, 1, a.size)
    pb = _np(rng, b.colour, b.shape, 1, b.size, generic=rng.random() < 0.2)
    text = f'{pa} {rel} {pb}{outro}'
  elif template == 1:  # Count of everything, then some of it.
    n = len(scene.objects)
    what = _pick(rng, _GENERIC)
    head = f'a single {what}' if n == 1 else f'{_COUNTS[n]} {plural(what)}'
    sep = ': ' if k == len(groups) else ' including '
    text = f'{head}{outro}{sep}{listed}'
  elif template == 2:  # There is / there are.
    first = chosen[0][1]
    text = f'there {"is" if len(first) == 1 else "are"} {listed}{outro}'
  else:
    intro = _pick(rng, ('', 'a picture of ', 'an image of ', 'a photo with ',
                        'this image shows '))
    text = f'{intro}{listed}{outro}'
  return text[0].upper() + text[1:] + '.'


# ----------------------------------------------------------------- records

def make_pair(seed: int, split: str, index: int, params: WorldParams) -> dict:
  """Pair record `index` of `split` (see records.py for the schema)."""
  rng = np.random.default_rng([seed, split_id(split), index])
  scene = sample_scene(rng, params)
  boxes, tags, conf, feats = detect_regions(scene, rng, params)
  record = {
      'image_id': image_id_of(seed, split, index),
      'caption': describe(scene, rng),
      'region_feats': feats, 'region_boxes': boxes,
      'region_tags': tags, 'region_conf': conf,
  }
  if params.images:
    record[records.IMAGE_FIELD] = image_store.encode_png(scene.image)
  return record


def make_meta(params: WorldParams, seed: int, splits: dict[str, int]) -> dict:
  return {
      'tags': list(WORLD_TAGS), 'synonyms': dict(WORLD_SYNONYMS),
      'feature_dim': params.feature_dim, 'splits': dict(splits),
      'generator': {'name': 'cmal_jax.world.scenes', 'seed': seed,
                    **dataclasses.asdict(params)},
  }


def _make_range(args):
  seed, split, start, stop, params = args
  return [make_pair(seed, split, i, params) for i in range(start, stop)]


def image_id_of(seed: int, split: str, index: int) -> str:
  """The image id of pair `index` of a split (make_pair's)."""
  return f'{split}-{seed}-{index:07d}'


def generate_splits(out_dir: str, sizes: dict[str, int],
                    params: WorldParams = WorldParams(), seed: int = 0,
                    workers: int = 1) -> dict[str, str]:
  """Writes the pairs of each split, by reference (data/pair_source.py):
  every scene's regions (and image) into out_dir's region store, added to
  the images already there, then out_dir/{split}.array_record of caption
  records naming them, and meta.json. Returns {split: caption file}.

  A world image has one caption, so by reference it is stored once either
  way; the layout is the one converted corpora use.
  """
  chunks = [(seed, split, a, min(a + 500, num), params)
            for split, num in sizes.items() for a in range(0, num, 500)]
  captions = {split: [] for split in sizes}

  def region_records():
    if workers > 1:
      import multiprocessing as mp
      with mp.get_context('spawn').Pool(workers) as pool:
        done = pool.imap(_make_range, chunks)  # imap keeps order.
        for (_, split, *_), pairs in zip(chunks, done):
          yield from _split_pairs(pairs, captions[split])
    else:
      for chunk in chunks:
        yield from _split_pairs(_make_range(chunk), captions[chunk[1]])

  meta = make_meta(params, seed, dict(sizes))
  records.check_meta_compatible(out_dir, meta)  # Fail before the long part.
  os.makedirs(out_dir, exist_ok=True)
  region_store.add_to_store(
      region_store.store_path(out_dir), region_records(), params.feature_dim,
      replaced={image_id_of(seed, split, i)
                for split, num in sizes.items() for i in range(num)})
  paths = {}
  for split, caption_records in captions.items():
    paths[split] = records.split_path(out_dir, split)
    records.write_records(paths[split], caption_records)
  records.write_meta(out_dir, meta)
  return paths


def _split_pairs(pairs, captions):
  """Yields each pair record's region record; appends its caption record
  to `captions`."""
  for pair in pairs:
    captions.append({'image_id': pair['image_id'],
                     'caption': pair['caption']})
    yield {k: v for k, v in pair.items() if k != 'caption'}


def generate_split(out_dir: str, split: str, num: int,
                   params: WorldParams = WorldParams(), seed: int = 0,
                   workers: int = 1) -> str:
  """generate_splits of one split; returns its caption file."""
  return generate_splits(out_dir, {split: num}, params, seed, workers)[split]


# ----------------------------------------------------------------- previews

def preview(record: dict, image: np.ndarray, scale: int = 4):
  """PIL image: upscaled scene, region boxes + tags, caption underneath."""
  from PIL import Image, ImageDraw
  import textwrap
  h, w = image.shape[:2]
  lines = textwrap.wrap(record['caption'], width=max(20, w * scale // 7))
  canvas = Image.new('RGB', (w * scale, h * scale + 14 * len(lines) + 8),
                     'white')
  canvas.paste(Image.fromarray(image).resize((w * scale, h * scale),
                                             Image.NEAREST))
  draw = ImageDraw.Draw(canvas)
  for box, tag, c in zip(record['region_boxes'], record['region_tags'],
                         record['region_conf']):
    x1, y1, x2, y2 = (np.asarray(box) * [w, h, w, h] * scale).tolist()
    colour = 'magenta' if tag else 'gray'
    draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=colour)
    label = f'{tag or "bg"} {c:.2f}'
    ty = y1 - 11 if y1 >= 11 else y2  # Label above the box, else below.
    draw.rectangle(draw.textbbox((x1, ty), label), fill=colour)
    draw.text((x1, ty), label, fill='white')
  for i, line in enumerate(lines):
    draw.text((4, h * scale + 4 + 14 * i), line, fill='black')
  return canvas


def write_previews(out_dir, split, num, params, seed):
  os.makedirs(os.path.join(out_dir, 'previews'), exist_ok=True)
  paths = []
  for i in range(num):
    rng = np.random.default_rng([seed, split_id(split), i])
    image = sample_scene(rng, params).image  # Same stream as make_pair.
    p = os.path.join(out_dir, 'previews', f'{split}_{i}.png')
    preview(make_pair(seed, split, i, params), image).save(p)
    paths.append(p)
  return paths


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--out', required=True, help='Dataset directory.')
  ap.add_argument('--split', default='pretrain')
  ap.add_argument('--num', type=int, required=True)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--feature_dim', type=int, default=256)
  ap.add_argument('--image_size', type=int, default=64)
  ap.add_argument('--previews', type=int, default=4)
  ap.add_argument('--workers', type=int, default=1)
  ap.add_argument('--images', action='store_true',
                  help='Also store each scene as PNG bytes (a model that '
                  'reads pixels needs them).')
  cli_errors.add_verbose_flag(ap)
  a = ap.parse_args(argv)
  params = WorldParams(image_size=a.image_size, feature_dim=a.feature_dim,
                       images=a.images)
  t0 = time.time()
  path = generate_split(a.out, a.split, a.num, params, a.seed, a.workers)
  dt = time.time() - t0
  write_previews(a.out, a.split, min(a.previews, a.num), params, a.seed)
  print(f'wrote {a.num} pairs to {path} in {dt:.1f}s '
        f'({a.num / max(dt, 1e-9):.0f} pairs/s)')
  return path


if __name__ == '__main__':
  cli_errors.run_tool('scenes', main)
