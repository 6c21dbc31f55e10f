"""Peak memory of the bottom-up TSV converter: flat in the number of images.

  python -m cmal_jax.benchmarks.convert_memory --images=2000,20000 \\
      --boxes=36 --feature_dim=2048 --dir=/tmp/convert_memory

For each size, writes a TSV in the bottom-up-attention format (9 columns:
image_id, image_w, image_h, num_boxes, boxes, features, objects_id int64,
objects_conf, attrs_id int64, each array base64 of float32/int64 bytes)
and a 1600-class vocabulary, converts it in a fresh process, and prints
that process's peak RSS (getrusage ru_maxrss) and its RSS once the modules
are imported (before any line is read), so the difference is what the
conversion itself holds. Files are deleted after each size unless --keep.
A 36 x 2048 image is ~393 KB of TSV and ~295 KB of store: check the disk
(the script refuses a size that would not fit).
"""

import argparse
import base64
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

FIELDNAMES = ['image_id', 'image_w', 'image_h', 'num_boxes', 'boxes',
              'features', 'objects_id', 'objects_conf', 'attrs_id']
NUM_CLASSES = 1600
# Distinct feature blocks cycled through the images: random features for
# every image would make generating, not converting, the slow part.
POOL = 16


def _b64(array: np.ndarray) -> str:
  return base64.b64encode(array.tobytes()).decode('ascii')


def write_vocab(path: str, num_classes: int = NUM_CLASSES):
  """class0,class0s / class1,class1s / ...: canonical name + a synonym."""
  with open(path, 'w') as f:
    for i in range(num_classes):
      f.write(f'class{i},class{i}s\n')


def write_tsv(path: str, num_images: int, num_boxes: int, feature_dim: int,
              seed: int = 0):
  """A bottom-up-attention TSV of num_images lines (see the docstring)."""
  rng = np.random.default_rng(seed)
  width, height = 640, 480
  pool = [_b64(rng.random((num_boxes, feature_dim), np.float32) * 10)
          for _ in range(POOL)]
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, delimiter='\t', fieldnames=FIELDNAMES)
    for i in range(num_images):
      x1 = rng.uniform(0, width / 2, num_boxes)
      y1 = rng.uniform(0, height / 2, num_boxes)
      boxes = np.stack([x1, y1, x1 + rng.uniform(1, width / 2, num_boxes),
                        y1 + rng.uniform(1, height / 2, num_boxes)], 1)
      writer.writerow({
          'image_id': i, 'image_w': width, 'image_h': height,
          'num_boxes': num_boxes, 'boxes': _b64(boxes.astype(np.float32)),
          'features': pool[i % POOL],
          'objects_id': _b64(rng.integers(0, NUM_CLASSES, num_boxes)),
          'objects_conf': _b64(rng.random(num_boxes, np.float32)),
          'attrs_id': _b64(rng.integers(0, 400, num_boxes))})


def _rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB.


def measure(tsv: str, vocab: str, out: str, float16: bool) -> dict:
  """Converts in this process; returns RSS figures (run it in a fresh one)."""
  from cmal_jax.convert.formats import bottom_up
  imported = _rss_mb()
  start = time.time()
  n, skipped = bottom_up.convert_bottom_up([tsv], vocab, out, float16=float16)
  return dict(images=n, skipped=skipped, seconds=time.time() - start,
              rss_after_import_mb=imported, peak_rss_mb=_rss_mb())


def _child(tsv, vocab, out, float16) -> dict:
  cmd = [sys.executable, '-m', 'cmal_jax.benchmarks.convert_memory',
         '--measure', tsv, vocab, out] + (['--float16'] if float16 else [])
  done = subprocess.run(cmd, check=True, capture_output=True, text=True)
  return json.loads(done.stdout.strip().splitlines()[-1])


def _check_disk(directory, num_images, num_boxes, feature_dim, float16):
  per_image = num_boxes * feature_dim * 4
  need = num_images * per_image * (4 / 3 + (0.5 if float16 else 1.0))
  free = shutil.disk_usage(directory).free
  if need > 0.9 * free:
    raise SystemExit(f'{num_images} images of {num_boxes} x {feature_dim} '
                     f'need ~{need / 1e9:.1f} GB, {directory} has '
                     f'{free / 1e9:.1f} GB free: lower --feature_dim')


def run(sizes, num_boxes, feature_dim, directory, float16, keep) -> list:
  os.makedirs(directory, exist_ok=True)
  vocab = os.path.join(directory, 'objects_vocab.txt')
  write_vocab(vocab)
  rows = []
  for num_images in sizes:
    _check_disk(directory, num_images, num_boxes, feature_dim, float16)
    tsv = os.path.join(directory, f'features_{num_images}.tsv')
    out = os.path.join(directory, f'store_{num_images}')
    shutil.rmtree(out, ignore_errors=True)
    start = time.time()
    write_tsv(tsv, num_images, num_boxes, feature_dim)
    row = dict(_child(tsv, vocab, out, float16), num_boxes=num_boxes,
               feature_dim=feature_dim, float16=float16,
               tsv_gb=os.path.getsize(tsv) / 1e9,
               generate_seconds=time.time() - start)
    print(f'{num_images:>7} images x {num_boxes} x {feature_dim}'
          f'{" (float16)" if float16 else ""}: TSV {row["tsv_gb"]:.2f} GB, '
          f'converted in {row["seconds"]:.0f} s, peak RSS '
          f'{row["peak_rss_mb"]:.0f} MB ({row["rss_after_import_mb"]:.0f} MB '
          'after imports)', flush=True)
    rows.append(row)
    if not keep:
      os.remove(tsv)
      shutil.rmtree(out)
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--images', default='2000,20000',
                  help='Comma-separated numbers of images, one TSV each.')
  ap.add_argument('--boxes', type=int, default=36)
  ap.add_argument('--feature_dim', type=int, default=2048)
  ap.add_argument('--dir', default='/tmp/convert_memory')
  ap.add_argument('--float16', action='store_true')
  ap.add_argument('--keep', action='store_true', help='Keep TSVs and stores.')
  ap.add_argument('--measure', nargs=3, metavar=('TSV', 'VOCAB', 'OUT'),
                  help='(Internal) convert in this process, print JSON.')
  a = ap.parse_args(argv)
  if a.measure:
    print(json.dumps(measure(*a.measure, float16=a.float16)))
    return None
  sizes = [int(s) for s in a.images.split(',') if s]
  return run(sizes, a.boxes, a.feature_dim, a.dir, a.float16, a.keep)


if __name__ == '__main__':
  main()
