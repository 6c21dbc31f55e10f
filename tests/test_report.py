"""The run report (python -m cmal_jax.report) on a synthetic workdir written
the way train.py writes one; no training."""

import json
import os
import re
import subprocess
import sys

import pytest

from cmal_jax import report
from configs import pretrain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
BATCH = 32


def training_line(i):
  """The i-th (0-based) training line, logged at step 10 * (i + 1)."""
  steps_per_sec = 0.5 if i == 0 else 2.0 + 0.1 * i  # First: compilation.
  return {
      'step': 10 * (i + 1),
      'loss': 6.0 - 0.3 * i + 0.00123,
      'loss_amc_pair': 1.5 - 0.1 * i + 0.00456,
      'loss_amc_label': 2.0 - 0.05 * i,
      'loss_mlm': 2.3456789 - 0.1 * i,
      'loss_itm': 0.69 - 0.01 * i,
      'acc_amc_pair': 0.1 + 0.05 * i,
      'acc_mlm': 0.05 + 0.02 * i,
      'acc_itm': 0.5 + 0.03 * i,
      'lr': 2e-3 * (i + 1) / 10,
      'grad_norm': 3.0 - 0.2 * i,
      'update_skipped': 0.0,
      'steps_per_sec': steps_per_sec,
      'examples_per_sec': steps_per_sec * BATCH,
      'epoch': 320.0 * (i + 1) / 1024,
      'nonfinite_skips': 1.0 if i >= 4 else 0.0,
      # Counters: cumulative; MetricWriter writes every scalar as a float.
      'data/examples': float(320 * (i + 1)),
      'data/itm_negatives': float(160 * (i + 1)),
      'data/captions_truncated': float(3 * (i + 1)),
      'data/regions_truncated': float(7 * (i + 1)),
      'data/anchors_truncated': float(i),
      'data/skipped_bad_record': float(i // 2),
  }


TRAIN = [training_line(i) for i in range(10)]
# A periodic evaluation at step 50 and the final one at step 100 (which, like
# train.py's, also carries eval/step and eval/nonfinite_skips).
EVAL_50 = {'step': 50, 'eval/amc_pair_acc': 0.6, 'eval/itm_acc': 0.7,
           'eval/mlm_acc': 0.2, 'eval/num_pairs': 128.0}
FINAL = {'amc_pair_acc': 0.55, 'itm_acc': 0.8, 'mlm_acc': 0.25,
         'retrieval_t2i_r1': 0.3125, 'num_pairs': 128}
EVAL_100 = dict({f'eval/{k}': float(v) for k, v in FINAL.items()}, step=100,
                **{'eval/step': 100.0, 'eval/nonfinite_skips': 1.0})


def write_lines(path, lines):
  with open(path, 'w') as f:
    f.writelines(json.dumps(m) + '\n' for m in lines)


@pytest.fixture
def workdir(tmp_path):
  """A finished tiny run: total_steps 100 and optim.lr 2e-3 overridden."""
  config = pretrain.get_config('tiny')
  config.total_steps = 100
  config.optim.lr = 2e-3
  (tmp_path / 'config.json').write_text(config.to_json_best_effort(indent=2))
  write_lines(tmp_path / 'metrics.jsonl',
              TRAIN[:5] + [EVAL_50] + TRAIN[5:] + [EVAL_100])
  evaluation = dict(FINAL, step=100, nonfinite_skips=1,
                    data_stats={'examples': 3200})
  (tmp_path / 'eval.json').write_text(json.dumps(evaluation))
  return str(tmp_path)


def section(summary, title):
  """The block of the summary whose first line starts with `title`."""
  blocks = [b for b in summary.split('\n\n') if b.startswith(title)]
  assert len(blocks) == 1, f'{title!r} not in:\n{summary}'
  return blocks[0]


def table_rows(block):
  """{first column: the other columns} of the table in a block."""
  lines = block.splitlines()[3:]  # Title, header, dashes.
  return {line.split()[0]: line.split()[1:] for line in lines
          if line.startswith('  ') and not line.startswith('  extra keys')}


def test_config_diff_lists_only_overridden_keys(workdir):
  block = section(report.summarize(workdir), 'Config vs defaults (tiny,cmal)')
  assert table_rows(block) == {'optim.lr': ['0.001', '0.002'],
                               'total_steps': ['200', '100']}
  assert 'batch_size' not in block and 'model.hidden_dim' not in block


def test_config_keys_not_in_the_defaults_are_noted_not_compared(workdir):
  path = os.path.join(workdir, 'config.json')
  with open(path) as f:
    config = json.load(f)
  config['notes'] = {'owner': 'me'}
  with open(path, 'w') as f:
    json.dump(config, f)
  block = section(report.summarize(workdir), 'Config vs defaults')
  assert 'extra keys (not in the defaults, ignored): notes.owner' in block
  assert set(table_rows(block)) == {'optim.lr', 'total_steps'}


def test_steps_done_against_total(workdir):
  assert '  steps          100 / 100\n' in report.summarize(workdir)


def test_final_training_metrics_are_the_last_lines(workdir):
  block = section(report.summarize(workdir), 'Final training metrics')
  assert block.splitlines()[0] == 'Final training metrics (step 100)'
  last = TRAIN[-1]
  rows = table_rows(block)
  expected = {k: [f'{last[k]:.4f}'] for k in last
              if k == 'loss' or k.startswith(('loss_', 'acc_'))}
  expected['grad_norm'] = [f'{last["grad_norm"]:.4f}']
  expected['lr'] = [f'{last["lr"]:.3e}']
  assert rows == expected
  assert rows['loss_mlm'] == ['1.4457']  # 2.3456789 - 0.9, to 4 decimals.


def test_final_evaluation_from_eval_json(workdir):
  block = section(report.summarize(workdir), 'Final evaluation')
  assert block.splitlines()[0] == 'Final evaluation (eval.json, step 100)'
  assert table_rows(block) == {
      'amc_pair_acc': ['0.5500'], 'itm_acc': ['0.8000'],
      'mlm_acc': ['0.2500'], 'num_pairs': ['128'],
      'retrieval_t2i_r1': ['0.3125']}


def test_final_evaluation_falls_back_to_the_last_eval_line(workdir):
  os.remove(os.path.join(workdir, 'eval.json'))
  block = section(report.summarize(workdir), 'Last evaluation')
  assert 'step 100; eval.json missing' in block.splitlines()[0]
  rows = table_rows(block)
  assert rows['itm_acc'] == ['0.8000'] and rows['num_pairs'] == ['128']
  assert 'step' not in rows and 'nonfinite_skips' not in rows


def test_best_metric_is_the_max_over_eval_lines_with_its_step(workdir):
  block = section(report.summarize(workdir), 'Best evaluation')
  assert table_rows(block) == {
      'amc_pair_acc': ['0.6000', '50'], 'itm_acc': ['0.8000', '100'],
      'mlm_acc': ['0.2500', '100'], 'retrieval_t2i_r1': ['0.3125', '100']}


def test_best_json_wins_when_present(workdir):
  with open(os.path.join(workdir, 'best.json'), 'w') as f:
    json.dump({'metric': 'amc_pair_acc', 'value': 0.6, 'step': 50}, f)
  block = section(report.summarize(workdir), 'Best evaluation')
  assert 'best.json: amc_pair_acc = 0.6000 at step 50' in block


def test_data_counters_and_skipped_share(workdir):
  rows = table_rows(section(report.summarize(workdir), 'Data counters'))
  assert rows['examples'] == ['3200']
  assert rows['captions_truncated'] == ['30']
  assert rows['skipped_bad_record'] == ['4', f'{100 * 4 / 3200:.2f}%']
  assert rows['nonfinite_skips'] == ['1']


def test_throughput_excludes_the_first_line(workdir):
  rows = table_rows(section(report.summarize(workdir), 'Throughput'))
  steps = [m['steps_per_sec'] for m in TRAIN[1:]]
  examples = [m['examples_per_sec'] for m in TRAIN[1:]]
  assert rows['steps_per_sec'] == [f'{sum(steps) / 9:.2f}', '9']
  assert rows['examples_per_sec'] == [f'{sum(examples) / 9:.2f}', '9']
  with_first = sum(m['steps_per_sec'] for m in TRAIN) / 10
  assert rows['steps_per_sec'][0] != f'{with_first:.2f}'


def test_plots_are_pngs(workdir):
  paths = report.plot_curves(workdir)
  assert [os.path.basename(p) for p in paths] == ['curves_loss.png',
                                                  'curves_accuracy.png']
  for path in paths:
    with open(path, 'rb') as f:
      data = f.read()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 5_000, (path, len(data))


def test_no_plots_flag_writes_none(workdir, capsys):
  report.main([f'--workdir={workdir}', '--no-plots'])
  assert 'Run report:' in capsys.readouterr().out
  assert not any(n.endswith('.png') for n in os.listdir(workdir))


def test_missing_metrics_is_reported_not_a_crash(workdir):
  os.remove(os.path.join(workdir, 'metrics.jsonl'))
  summary = report.summarize(workdir)
  assert '  metrics.jsonl  missing\n' in summary
  assert 'metrics.jsonl missing: no training metrics' in summary
  # eval.json still gives the evaluation and its data counters.
  assert 'Final evaluation (eval.json, step 100)' in summary
  assert table_rows(section(summary, 'Data counters')) == {
      'examples': ['3200'], 'nonfinite_skips': ['1']}
  assert report.plot_curves(workdir) == []
  assert not any(n.endswith('.png') for n in os.listdir(workdir))


def test_missing_workdir_raises(tmp_path):
  with pytest.raises(FileNotFoundError, match='no such directory'):
    report.summarize(str(tmp_path / 'nope'))


@pytest.mark.parametrize('bad', ['{"step": 30, "loss": 1.0', 'not json',
                                 '[1, 2]', '{"loss": 1.0}'])
def test_malformed_line_names_file_and_line(workdir, bad):
  path = os.path.join(workdir, 'metrics.jsonl')
  with open(path) as f:
    lines = f.readlines()
  lines[2] = bad + '\n'
  with open(path, 'w') as f:
    f.writelines(lines)
  match = re.escape(f'{path}: line 3: ')
  with pytest.raises(ValueError, match=match):
    report.summarize(workdir)
  with pytest.raises(ValueError, match=match):
    report.plot_curves(workdir)


def run_cli(workdir):
  return subprocess.run(
      [sys.executable, '-m', 'cmal_jax.report', f'--workdir={workdir}'],
      cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli(workdir):
  result = run_cli(workdir)
  assert result.returncode == 0, result.stderr
  assert '  size/recipe    tiny/cmal\n' in result.stdout
  assert '  steps          100 / 100\n' in result.stdout
  assert 'curves_loss.png' in result.stdout
  assert os.path.exists(os.path.join(workdir, 'curves_accuracy.png'))


def test_cli_malformed_line_is_a_one_line_error(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write('{"step": 110, "lo\n')
  result = run_cli(workdir)
  assert result.returncode == 1
  assert 'metrics.jsonl: line 13: not valid JSON' in result.stderr
  assert 'Traceback' not in result.stderr


def test_unterminated_last_line_of_a_killed_run_is_ignored(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  before = report.read_metrics(path)
  with open(path, 'a') as f:
    f.write('{"step": 110, "lo')  # No newline: the writer was killed.
  assert report.read_metrics(path) == before


def test_seed_table_is_mean_and_std_over_each_settings_files(tmp_path,
                                                              capsys):
  for name, values in (('a', (0.5, 0.7)), ('b', (0.25,))):
    for seed, v in enumerate(values):
      (tmp_path / f'{name}_s{seed}.json').write_text(
          json.dumps({'amc_pair_acc': v, 'step': 10}))
  report.main(['--table', f'a={tmp_path}/a_s*.json',
               f'b={tmp_path}/b_s*.json', '--metrics=amc_pair_acc,itm_acc'])
  assert capsys.readouterr().out.splitlines() == [
      '| metric | a (n=2) | b (n=1) |', '|---|---|---|',
      '| amc_pair_acc | 0.600 ± 0.100 | 0.250 |',
      '| itm_acc | n/a | n/a |']
  with pytest.raises(FileNotFoundError, match='--table c: no file matches'):
    report.main(['--table', f'c={tmp_path}/none*.json', '--metrics=x'])
  with pytest.raises(SystemExit):
    report.main(['--table', f'a={tmp_path}/a_s*.json'])  # No --metrics.


def test_table_reads_a_splits_metric(tmp_path, capsys):
  for seed, v in enumerate((0.4, 0.6)):
    (tmp_path / f'ft_s{seed}.json').write_text(json.dumps(
        {'task': 'vqa', 'test': {'vqa_accuracy': v, 'blind_baseline': 0.3}}))
  report.main(['--table', f'ft={tmp_path}/ft_s*.json',
               '--metrics=test/vqa_accuracy,test/blind_baseline,val/x'])
  assert capsys.readouterr().out.splitlines()[2:] == [
      '| test/vqa_accuracy | 0.500 ± 0.100 |',
      '| test/blind_baseline | 0.300 ± 0.000 |', '| val/x | n/a |']


def fine_tuning_run(path, curve, blind):
  path.mkdir()
  write_lines(path / 'metrics.jsonl', [{'step': s, 'eval/vqa_accuracy': v}
                                       for s, v in curve])
  (path / 'eval.json').write_text(json.dumps(
      {'val': {'blind_baseline': blind}}))
  return str(path)


def test_learning_curves_average_runs_on_their_common_steps(tmp_path,
                                                            capsys):
  """Workdirs and one-hour baseline results plot side by side: a setting's
  line is the mean over its runs at the steps they all evaluated, the band
  its std; the blind baseline from their files."""
  fine_tuning_run(tmp_path / 'pre_s0', [(100, 0.4), (200, 0.5)], 0.3)
  fine_tuning_run(tmp_path / 'pre_s1', [(100, 0.6), (200, 0.7), (300, 0.9)],
                  0.3)
  (tmp_path / 'base_s0.json').write_text(json.dumps(
      {'val_split': 'val', 'val_curve': [[100, 0.25], [200, 0.35]],
       'blind_baseline': {'val': 0.3, 'test': 0.2}}))
  out = str(tmp_path / 'docs' / 'curves.png')
  report.main(['--curves', f'pretrained={tmp_path}/pre_s*',
               f'baseline={tmp_path}/base_s*.json', '--metric=vqa_accuracy',
               f'--out={out}'])
  assert capsys.readouterr().out.splitlines() == [
      'pretrained: 100 0.500±0.100, 200 0.600±0.100',
      'baseline: 100 0.250±0.000, 200 0.350±0.000', f'Wrote {out}']
  with open(out, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  (tmp_path / 'other.json').write_text('{"val": {}}')
  with pytest.raises(ValueError, match='other.json: not a one-hour baseline'):
    report.main(['--curves', f'x={tmp_path}/other.json',
                 '--metric=vqa_accuracy', f'--out={out}'])
  with pytest.raises(ValueError, match='pre_s0: no evaluation of accuracy'):
    report.main(['--curves', f'x={tmp_path}/pre_s0', '--metric=accuracy',
                 f'--out={out}'])
