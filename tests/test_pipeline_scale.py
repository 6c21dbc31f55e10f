"""The corpus-scale pipeline benchmark, on a corpus small enough for CI:
its disk figures against the files, its report, and BENCHMARKS.md's
sections kept by both benchmark commands."""

import json
import os

import pytest

from cmal_jax.benchmarks import pipeline_scale, sections
from cmal_jax.data import records, region_store


def test_pipeline_scale_reports_disk_speed_and_headroom(tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'BENCHMARKS.md').write_text('# Benchmarks\n\nthe step table\n')
  corpus = str(tmp_path / 'corpus')
  pipeline_scale.main([f'--dir={corpus}', '--pairs=400', '--images=40',
                       '--regions=6', '--feature_dim=16', '--batch=16',
                       '--batches=2', '--warmup=1', '--variants=t1w0',
                       f'--out_dir={out}'])
  report = json.loads((out / 'BENCHMARKS_pipeline_scale.json').read_text())
  # The corpus: 10 caption records per image, one store record per image.
  assert records.read_meta(corpus)['splits'] == {'pretrain': 400}
  assert len(region_store.RegionStore(region_store.store_path(corpus))) == 40
  disk = report['disk']
  store = os.path.getsize(region_store.store_path(corpus))
  captions = os.path.getsize(records.split_path(corpus, 'pretrain'))
  assert disk['caption_file_bytes'] == captions
  assert disk['per_pair'] == pytest.approx(
      (disk['store_bytes'] + captions) / 400)
  assert disk['per_pair_copied'] == pytest.approx(store / 40 + captions / 400)
  # 2048 features: 6 regions x (2048 - 16) more float16 values per image.
  assert disk['per_pair_copied_2048'] - disk['per_pair_copied'] == (
      pytest.approx(6 * 2032 * 2))
  (run,) = report['runs']
  assert (run['threads'], run['workers']) == (1, 0)
  assert run['examples_per_sec'] > 0 and run['startup_s'] > 0
  assert run['peak_rss_bytes'] > 0 and run['workers_peak_rss_bytes'] == 0
  hosts = report['consumption']
  assert set(hosts) == set(pipeline_scale.HOSTS)
  for c in hosts.values():  # 50 % MFU is faster than the roofline's pace.
    assert c['at_50pct_mfu'] > c['at_roofline'] > 0
  text = (out / 'BENCHMARKS.md').read_text()
  assert text.startswith('# Benchmarks\n\nthe step table\n')
  assert text.count('<!-- begin pipeline_scale -->') == 1
  assert '| 1 | 0 |' in text and '8x H100 host' in text
  assert set(report['read_ms']) == {'captions', 'store'}
  assert all(ms['ours'] > 0 and ms['grain'] > 0
             for ms in report['read_ms'].values())


def test_sections_are_replaced_and_kept(tmp_path):
  path = str(tmp_path / 'B.md')
  sections.write_section(path, 'a', ['one'])
  sections.write_section(path, 'b', ['two'])
  sections.write_section(path, 'a', ['three'])
  text = open(path).read()
  assert text == ('<!-- begin a -->\nthree\n<!-- end a -->\n\n'
                  '<!-- begin b -->\ntwo\n<!-- end b -->\n')
  assert sections.read_sections(path) == [
      '<!-- begin a -->\nthree\n<!-- end a -->\n',
      '<!-- begin b -->\ntwo\n<!-- end b -->\n']
