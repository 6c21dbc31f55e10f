"""The pre-training input pipeline at corpus scale, pairs by reference.

  python -m cmal_jax.benchmarks.pipeline_scale --pairs=1000000 \\
      --images=100000 --feature_dim=256 --dir=/tmp/pipeline_scale --out_dir=.

Generates (once; reused when --dir holds it) a corpus in the layout the
converters write (data/pair_source.py): a region store of --images images,
each with --regions regions of --feature_dim float16 features (COCO's
bottom-up features are 36 x 2048), and --pairs caption records naming them
(pairs / images captions per image, COCO-like at 10:1 by default: COCO has
5, Visual Genome's region descriptions ~50), each caption naming two of its
image's tags so that anchors are found. Then, each in a fresh process, it
reads the pairs through pipeline.make_dataset at the `base` config's shapes
(batch 256, 40 tokens, 36 regions) with each Grain setting of --variants
(read threads, and worker processes through IterDataset.mp_prefetch), and
reports:

  disk per pair       (store + caption file) / pairs, against the copied
                      layout (each caption carrying its image), and both
                      scaled to 2048 features (the store grows linearly in
                      the width; the captions do not);
  startup             seconds from make_dataset to the first batch (opening
                      the store and its index, the caption file, and the
                      first batch);
  examples/s          after --warmup batches, over --batches batches;
  peak memory         the reading process's peak RSS, and its workers';
  headroom            examples/s over what the `base` step consumes per
                      host, from BENCHMARKS.json's paper projections (one
                      device's step at batch 256 at 50 % MFU and at its
                      roofline, times the host's devices: 8 for an H100
                      host, 4 for a TPU v5e host).

The figures go to OUT_DIR/BENCHMARKS.md (their own section, kept when
`python -m cmal_jax.benchmarks` rewrites the rest) and
OUT_DIR/BENCHMARKS_pipeline_scale.json. Files in --dir are kept for the next
run unless --delete.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

from absl import flags
import grain
import numpy as np

from cmal_jax import cli_errors, config_base
from cmal_jax.benchmarks import sections
from cmal_jax.data import pipeline
from cmal_jax.data import records
from cmal_jax.data import region_store

NUM_TAGS = 1600  # Visual Genome's detector classes.
POOL = 16  # Distinct feature blocks: random ones per image would make
# generating, not reading, the slow part.
# Devices per host of the projected hosts, and the accelerator of
# BENCHMARKS.json's paper_* rows.
HOSTS = {'8x H100 host': ('H100 SXM', 8), 'TPU v5e host': ('TPU v5e', 4)}
SECTION = 'pipeline_scale'


def tag_names(n=NUM_TAGS):
  return [f'object{i}' for i in range(n)]


def generate(directory, pairs, images, regions, feature_dim, seed=0):
  """Writes the corpus (store, caption records, meta.json) into directory;
  returns seconds taken."""
  t = time.time()
  rng = np.random.default_rng(seed)
  tags = tag_names()
  pool = [rng.normal(size=(regions, feature_dim)).astype(np.float16)
          for _ in range(POOL)]
  image_tags = rng.integers(NUM_TAGS, size=(images, regions))

  def region_records():
    for i in range(images):
      x1, y1 = rng.uniform(0, 0.5, (2, regions))
      boxes = np.stack([x1, y1, x1 + 0.4, y1 + 0.4], 1).astype(np.float32)
      yield {'image_id': str(i), 'region_feats': pool[i % POOL],
             'region_boxes': boxes,
             'region_tags': [tags[k] for k in image_tags[i]],
             'region_conf': np.ones(regions, np.float32)}

  def caption_records():
    for p in range(pairs):
      i = p % images  # Captions of an image spread over the file.
      a, b = image_tags[i][(p // images) % regions], image_tags[i][0]
      yield {'image_id': str(i),
             'caption': f'A {tags[a]} next to a {tags[b]} in picture {p}.'}

  os.makedirs(directory, exist_ok=True)
  region_store.write_region_store(region_store.store_path(directory),
                                  region_records(), feature_dim)
  records.write_records(records.split_path(directory, 'pretrain'),
                       caption_records())
  records.write_meta(directory, {
      'tags': tags, 'synonyms': {}, 'feature_dim': feature_dim,
      'feature_dtype': 'float16', 'splits': {'pretrain': pairs},
      'generator': {'name': 'cmal_jax.benchmarks.pipeline_scale',
                    'images': images, 'regions': regions, 'seed': seed}})
  return time.time() - t


def disk_figures(directory, pairs, images, regions, feature_dim):
  """Bytes per pair by reference and copied, as stored and at 2048."""
  store = region_store.store_path(directory)
  store_bytes = (os.path.getsize(store)
                 + os.path.getsize(region_store.index_path(store)))
  caption_bytes = os.path.getsize(records.split_path(directory, 'pretrain'))
  # An image's record as stored; copied, every caption carries one.
  image_bytes = os.path.getsize(store) / images
  # At 2048 features only region_feats grows (float16: 2 bytes a value).
  image_2048 = image_bytes + regions * (2048 - feature_dim) * 2
  index_per_image = (store_bytes - os.path.getsize(store)) / images
  return dict(
      store_bytes=store_bytes, caption_file_bytes=caption_bytes,
      per_pair=(store_bytes + caption_bytes) / pairs,
      per_pair_copied=image_bytes + caption_bytes / pairs,
      per_pair_2048=((image_2048 + index_per_image) * images
                     + caption_bytes) / pairs,
      per_pair_copied_2048=image_2048 + caption_bytes / pairs)


def read_costs(directory, reads=300, rounds=3, seed=0):
  """Milliseconds per random one-record read of the caption file and of the
  store: records.open_source (a range read) against grain's
  ArrayRecordDataSource (array_record's read([i])), alternated by round.
  -> {file: {'ours': ms, 'grain': ms}} (medians over the rounds)."""
  out = {}
  for name, path in (('captions', records.split_path(directory, 'pretrain')),
                     ('store', region_store.store_path(directory))):
    ours, grains = records.open_source(path), grain.sources.ArrayRecordDataSource(
        [path])
    rng = np.random.default_rng(seed)
    times = {'ours': [], 'grain': []}
    for _ in range(rounds):
      keys = rng.integers(len(ours), size=reads).tolist()
      for label, source in (('ours', ours), ('grain', grains)):
        t = time.perf_counter()
        for k in keys:
          source[k]
        times[label].append((time.perf_counter() - t) / reads * 1e3)
    out[name] = {k: float(np.median(v)) for k, v in times.items()}
  return out


def read_config(directory, feature_dim, threads, batch):
  c = config_base.config_module('pretrain').get_config('base')
  c.data.dir = directory
  c.model.region_feat_dim = feature_dim
  c.data.num_threads = threads
  c.batch_size = batch
  return c


def measure(directory, feature_dim, threads, workers, batches, warmup,
            batch):
  """One variant, in this process: startup, examples/s, peak RSS."""
  config = read_config(directory, feature_dim, threads, batch)
  t0 = time.perf_counter()
  ds, _, _ = pipeline.make_dataset(config, directory, 'pretrain',
                                   batch_size=batch, train=True, seed=0)
  it = pipeline.to_iter_dataset(ds, config)  # read_config set the threads.
  if workers:
    flags.FLAGS(  # Grain's workers read absl flags.
        sys.argv[:1], known_only=True)
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  it = iter(it)
  next(it)
  startup = time.perf_counter() - t0
  for _ in range(warmup):
    next(it)
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  seconds = time.perf_counter() - t
  return dict(threads=threads, workers=workers, startup_s=startup,
              examples_per_sec=batches * batch / seconds,
              peak_rss_bytes=resource.getrusage(
                  resource.RUSAGE_SELF).ru_maxrss * 1024,
              workers_peak_rss_bytes=children_peak_rss())


def children_peak_rss():
  """Summed peak RSS (VmHWM) of this process's live children, the Grain
  workers; 0 where /proc is not there (not Linux)."""
  total, me = 0, os.getpid()
  for pid in (p for p in os.listdir('/proc') if p.isdigit()) if os.path.isdir(
      '/proc') else ():
    try:
      with open(f'/proc/{pid}/status') as f:
        status = dict(line.split(':', 1) for line in f if ':' in line)
    except OSError:  # Gone meanwhile.
      continue
    if int(status.get('PPid', '0')) == me and 'VmHWM' in status:
      total += int(status['VmHWM'].split()[0]) * 1024
  return total


def consumption():
  """{host: (examples/s at 50 % MFU, at the roofline)} of the `base` step,
  from BENCHMARKS.json's paper projections."""
  path = os.path.join(os.path.dirname(__file__), '..', '..',
                      'BENCHMARKS.json')
  with open(path) as f:
    rows = {(m['name'], m['size']): m for m in
            json.load(f)['measurements']}
  out = {}
  for host, (device, count) in HOSTS.items():
    fast = rows[(f'paper_{device}_step_time_at_50pct_mfu', 'base')]
    roof = rows[(f'paper_{device}_step_time_roofline', 'base')]
    out[host] = (count * fast['batch'] / fast['value'],
                 count * roof['batch'] / roof['value'])
  return out


def parse_variants(text):
  """'t1w0,t2w0,t1w2' -> [(threads, workers)]."""
  out = []
  for v in text.split(','):
    threads, _, workers = v.strip().lstrip('t').partition('w')
    out.append((int(threads), int(workers or 0)))
  return out


def parse_args(argv):
  p = argparse.ArgumentParser(
      prog='python -m cmal_jax.benchmarks.pipeline_scale',
      description=__doc__.split('\n\n')[0])
  p.add_argument('--pairs', type=int, default=1_000_000)
  p.add_argument('--images', type=int, default=100_000)
  p.add_argument('--regions', type=int, default=36)
  p.add_argument('--feature_dim', type=int, default=256)
  p.add_argument('--dir', default='/tmp/pipeline_scale')
  p.add_argument('--variants', default='t1w0,t2w0,t1w2',
                 help='Grain settings: tNwM = N read threads, M worker '
                 'processes (0: none).')
  p.add_argument('--batch', type=int, default=256)
  p.add_argument('--batches', type=int, default=40)
  p.add_argument('--warmup', type=int, default=5)
  p.add_argument('--out_dir', default='.')
  p.add_argument('--delete', action='store_true',
                 help='Delete the corpus at the end.')
  p.add_argument('--measure', default='', help=argparse.SUPPRESS)
  cli_errors.add_verbose_flag(p)
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.measure:  # A child: one variant.
    threads, workers = parse_variants(args.measure)[0]
    print(json.dumps(measure(args.dir, args.feature_dim, threads, workers,
                             args.batches, args.warmup, args.batch)))
    return
  command = 'python -m cmal_jax.benchmarks.pipeline_scale ' + ' '.join(
      sys.argv[1:] if argv is None else argv)
  meta_path = os.path.join(args.dir, records.META_FILE)
  want = dict(images=args.images, regions=args.regions)
  have = (records.read_meta(args.dir) if os.path.exists(meta_path) else {})
  if (have.get('splits', {}).get('pretrain') != args.pairs
      or have.get('feature_dim') != args.feature_dim
      or any(have.get('generator', {}).get(k) != v for k, v in want.items())):
    shutil.rmtree(args.dir, ignore_errors=True)
    print(f'Generating {args.pairs} pairs over {args.images} images in '
          f'{args.dir} ...', flush=True)
    generated = generate(args.dir, args.pairs, args.images, args.regions,
                         args.feature_dim)
    print(f'  {generated:.0f} s', flush=True)
  disk = disk_figures(args.dir, args.pairs, args.images, args.regions,
                      args.feature_dim)
  load = os.getloadavg()
  reads = read_costs(args.dir)
  print(json.dumps(reads), flush=True)
  runs = []
  for threads, workers in parse_variants(args.variants):
    child = subprocess.run(
        [sys.executable, '-m', 'cmal_jax.benchmarks.pipeline_scale',
         f'--measure=t{threads}w{workers}', f'--dir={args.dir}',
         f'--feature_dim={args.feature_dim}', f'--batch={args.batch}',
         f'--batches={args.batches}', f'--warmup={args.warmup}'],
        capture_output=True, text=True, check=False)
    if child.returncode:
      raise RuntimeError(f'variant t{threads}w{workers} failed:\n'
                         f'{child.stderr[-3000:]}')
    runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
    print(json.dumps(runs[-1]), flush=True)
  hosts = consumption()
  best = max(r['examples_per_sec'] for r in runs)
  report = dict(command=command, cores=os.cpu_count(),
                load_average=dict(before=load, after=os.getloadavg()),
                pairs=args.pairs,
                images=args.images, regions=args.regions,
                feature_dim=args.feature_dim, batch=args.batch, disk=disk,
                read_ms=reads,
                runs=runs, consumption={h: dict(at_50pct_mfu=a, at_roofline=b)
                                        for h, (a, b) in hosts.items()})
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, 'BENCHMARKS_pipeline_scale.json'),
            'w') as f:
    json.dump(report, f, indent=1)
  lines = markdown(report, best)
  sections.write_section(os.path.join(args.out_dir, 'BENCHMARKS.md'),
                         SECTION, lines)
  print('\n'.join(lines))
  if args.delete:
    shutil.rmtree(args.dir)


def markdown(report, best):
  d, mb = report['disk'], 1024 ** 2
  lines = [
      '## The input pipeline at corpus scale', '',
      f'`{report["command"]}`, {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, '
      f'{report["cores"]} cores (load average {report["load_average"]["before"][0]:.1f} '
      f'before, {report["load_average"]["after"][0]:.1f} after): '
      f'{report["pairs"]:,} caption records over '
      f'{report["images"]:,} images, {report["regions"]} regions of '
      f'{report["feature_dim"]} float16 features each, read at the `base` '
      f'shapes, batch {report["batch"]}.', '',
      '| disk | stored | at 2048 features |', '|---|---|---|',
      f'| region store | {d["store_bytes"] / mb:,.0f} MiB | |',
      f'| caption records | {d["caption_file_bytes"] / mb:,.0f} MiB | |',
      f'| per pair, by reference | {d["per_pair"]:,.0f} B | '
      f'{d["per_pair_2048"]:,.0f} B |',
      f'| per pair, copied into each caption | {d["per_pair_copied"]:,.0f} B'
      f' | {d["per_pair_copied_2048"]:,.0f} B |', '',
      '| one random record read | ours (a range read) | grain\'s source '
      '(read([i])) | ratio |', '|---|---|---|---|']
  for name, ms in report['read_ms'].items():
    lines.append(f'| {name} | {ms["ours"]:.3f} ms | {ms["grain"]:.3f} ms | '
                 f'{ms["grain"] / ms["ours"]:.1f}x |')
  lines += [
      '',
      '| Grain read threads | worker processes | startup (to the first '
      'batch) | examples/s | peak RSS (reader / workers) |',
      '|---|---|---|---|---|']
  for r in report['runs']:
    lines.append(
        f'| {r["threads"]} | {r["workers"]} | {r["startup_s"]:.1f} s | '
        f'{r["examples_per_sec"]:,.0f} | {r["peak_rss_bytes"] / mb:,.0f} MiB'
        f' / {r["workers_peak_rss_bytes"] / mb:,.0f} MiB |')
  lines += ['', '| host | `base` step consumes (50 % MFU / roofline) | '
            'pipeline ÷ consumption, best setting here |', '|---|---|---|']
  for host, c in report['consumption'].items():
    lines.append(
        f'| {host} | {c["at_50pct_mfu"]:,.0f} / {c["at_roofline"]:,.0f} '
        f'examples/s | {best / c["at_50pct_mfu"]:.2f} / '
        f'{best / c["at_roofline"]:.2f} |')
  return lines


if __name__ == '__main__':
  cli_errors.run_tool('pipeline_scale', main)
