"""The data-efficiency experiment end to end on `tiny`: its smallest corpus,
one seed, every recipe, one ablation and a random init, one task; then a
resume that has nothing left to run."""

import json
import os
import subprocess

import numpy as np
import pytest

from cmal_jax.experiments import data_efficiency as de

ARGS = ['--size=tiny', '--corpus_sizes=256', '--seeds=0', '--tasks=ve',
        '--pretrain_steps=6', '--finetune_steps=4', '--retrieval_images=8',
        '--ablations=mask_only']


def git(folder, *args):
  return subprocess.run(['git', *args], cwd=folder, check=True,
                        capture_output=True, text=True).stdout


@pytest.fixture(scope='module')
def grid_out(tmp_path_factory, compilation_cache):
  out = tmp_path_factory.mktemp('data_efficiency')
  git(out, 'init', '-q')
  git(out, 'config', 'user.email', 'test@example.com')
  git(out, 'config', 'user.name', 'test')
  docs = out / 'docs'
  de.main(ARGS + [f'--out={out}', f'--docs={docs}', '--commit'])
  return out


def test_every_run_leaves_a_result(grid_out):
  names = sorted(os.listdir(grid_out / 'results'))
  assert names == sorted(
      [f'{k}-{r}-256-s0.json' for k in ('pretrain', 've')
       for r in de.RECIPES + ('cmal+mask_only',)] + ['ve-random-s0.json'])
  with open(grid_out / 'results' / 'pretrain-cmal-256-s0.json') as f:
    cmal = json.load(f)
  assert cmal['recipe'] == 'cmal' and cmal['corpus'] == 256
  assert 0 <= cmal['metrics']['amc_pair_acc'] <= 1
  with open(grid_out / 'results' / 'pretrain-cmcl-256-s0.json') as f:
    assert 'retrieval_itc_t2i_r1' in json.load(f)['metrics']
  with open(grid_out / 'results' / 've-cmcl-256-s0.json') as f:
    ve = json.load(f)
  assert ve['metrics']['metric'] == 'accuracy'
  assert 0 <= ve['metrics']['test'] <= 1
  with open(grid_out / 'runs' / 'pretrain-cmal+mask_only-256-s0' /
            'config.json') as f:
    cmap = json.load(f)['cmap']
  assert cmap['swap_prob'] == 0.0 and cmap['mask_prob'] == 0.9
  # Fine-tuning started from its recipe's pre-training run.
  with open(grid_out / 'runs' / 've-cmcl-256-s0' / 'config.json') as f:
    assert json.load(f)['init_from'].endswith('runs/pretrain-cmcl-256-s0')


def test_each_result_was_committed_as_it_finished(grid_out):
  log = git(grid_out, 'log', '--format=%s').splitlines()
  assert len(log) == 9 and log[-1] == 'data_efficiency: pretrain-cmal-256-s0'
  assert git(grid_out, 'ls-files').split() == sorted(
      f'results/{f}' for f in os.listdir(grid_out / 'results'))


def test_table_and_plot_are_written(grid_out):
  for folder in (grid_out, grid_out / 'docs'):
    text = (folder / 'data_efficiency.md').read_text()
    assert '9 of 9 runs finished' in text
    for recipe in de.RECIPES:
      assert f'| {recipe} | 256 | ' in text
    assert '| random init | - | ' in text
    blind = de.blind_baselines(grid_out, de.parse_args(ARGS + ['--out=x']))
    assert blind['ve'][2] == 1 and 0 < blind['ve'][0] < 1
    assert f"| blind baseline | - | {blind['ve'][0]:.3f} |" in text
    assert '| cmal+mask_only | 256 | ' in text
    assert '| cmal - cmcl | 256 | ' in text
    assert '| cmal+mask_only - cmal | 256 | ' in text
    assert (folder / 'data_efficiency.png').stat().st_size > 5000
    assert len(json.loads((folder / 'data_efficiency.json').read_text())) == 9


def test_a_rerun_resumes_with_nothing_to_do(grid_out, capsys):
  tasks = de.main(ARGS + [f'--out={grid_out}'])
  assert '9 runs, 9 done, 0 to go.' in capsys.readouterr().out
  mean, std, n = tasks[('ve', 'cmal', 256)]
  assert n == 1 and std == 0.0 and 0 <= mean <= 1


def test_bad_arguments_are_refused():
  with pytest.raises(SystemExit):
    de.parse_args(['--out=x', '--recipes=cmal,contrastive'])
  with pytest.raises(SystemExit):
    de.parse_args(['--out=x', '--tasks=captioning'])
  with pytest.raises(SystemExit):
    de.parse_args(['--out=x', '--ablations=no_swap'])


def test_model_ablations_hold_in_fine_tuning_and_cmap_ones_do_not():
  args = de.parse_args(['--out=x', '--size=tiny', '--ablations=all'])
  assert 'no_hypersphere' in args.ablations
  configs = {
      (kind, ablation): de.run_config(
          de.Run(kind, 0, 'cmal', 2000, 'pretrain' if kind == 'pretrain'
                 else 've', ablation), args, 'x')
      for kind in ('pretrain', 'finetune')
      for ablation in ('', 'no_hypersphere', 'mask_only')}
  assert configs['pretrain', ''].model.hypersphere
  assert not configs['pretrain', 'no_hypersphere'].model.hypersphere
  assert not configs['finetune', 'no_hypersphere'].model.hypersphere
  assert configs['finetune', 'no_hypersphere'].init_from == os.path.join(
      'x', 'runs', 'pretrain-cmal+no_hypersphere-2000-s0')
  assert configs['pretrain', 'mask_only'].cmap.swap_prob == 0.0
  # CMAP is pre-training's: a mask_only checkpoint fine-tunes like any.
  plain, masked = (configs['finetune', a].to_dict() for a in ('', 'mask_only'))
  assert plain.pop('init_from') != masked.pop('init_from')
  assert plain == masked


def test_a_failed_run_is_reported_and_the_rest_of_the_grid_finishes(
    tmp_path, monkeypatch, capsys):
  """A run that raises is named at the end (with the fine-tuning it
  blocked); every other run still finishes and leaves its result."""
  def fake_execute(run, args, out):
    if run.name == 'pretrain-cmcl-256-s0':
      raise RuntimeError('disk full')
    results = ({'amc_pair_acc': 0.5} if run.kind == 'pretrain' else
               {'val': {'accuracy': 0.5}, 'test': {'accuracy': 0.4},
                'best_step': 4})
    summary = de.summarise(run, results, 1.0)
    os.makedirs(os.path.join(out, 'results'), exist_ok=True)
    with open(de.result_path(out, run), 'w') as f:
      json.dump(summary, f)
    return summary

  monkeypatch.setattr(de, 'execute', fake_execute)
  monkeypatch.setattr(de, 'prepare_data', lambda *a: None)
  with pytest.raises(SystemExit) as failure:
    de.main(['--out', str(tmp_path), '--corpus_sizes=256', '--seeds=0',
             '--tasks=ve', '--recipes=cmal,cmcl'])
  assert str(failure.value) == (
      '2 run(s) failed (the rest finished; the same command retries them): '
      'pretrain-cmcl-256-s0: RuntimeError: disk full; ve-cmcl-256-s0: its '
      'pre-training pretrain-cmcl-256-s0 failed')
  assert sorted(os.listdir(tmp_path / 'results')) == [
      'pretrain-cmal-256-s0.json', 've-cmal-256-s0.json',
      've-random-s0.json']
  assert 'RuntimeError: disk full' in capsys.readouterr().err
  assert '3 of 5 runs finished' in (tmp_path / 'data_efficiency.md').read_text()


def test_ridge_probe_separates_what_is_separable_and_not_noise():
  from cmal_jax.experiments import anchor_diagnostics as ad
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2000, 8))
  fit = np.arange(2000) < 1000
  # Rare positives (10 %) shifted along one axis: balanced accuracy ~1.
  y = rng.uniform(size=2000) < 0.1
  assert ad.ridge_probe(x + 6.0 * y[:, None] * np.eye(8)[0], y, fit) > 0.99
  # Labels unrelated to x: chance.
  assert abs(ad.ridge_probe(x, y, fit) - 0.5) < 0.08


def test_anchor_diagnostics_on_a_pretrained_model(pretrained_tiny, tmp_path):
  from cmal_jax.experiments import anchor_diagnostics as ad
  out = tmp_path / 'diag.json'
  report = ad.main([f'--workdir={pretrained_tiny}', '--max_pairs=64',
                    f'--out={out}'])
  assert json.loads(out.read_text()) == json.loads(json.dumps(report))
  cov = report['coverage']
  assert cov['pairs'] == 64 and report['max_anchors'] == 4
  assert 0.5 < cov['with_anchor'] <= 1.0
  assert cov['with_anchor'] <= cov['anchors_per_pair'] <= 4 * cov[
      'with_anchor']
  assert 0 < cov['anchor_token_share'] < cov['anchor_region_share'] < 1
  assert all(0 <= v <= 1 for v in report['amc_all_swapped'].values())
  # Two encoders, two spheres: even an untrained model's swapped-in
  # features stand out linearly on both sides.
  assert report['swap_probe']['text'] > 0.9
  assert report['swap_probe']['region'] > 0.9


def test_paired_differences_pair_runs_by_seed():
  args = de.parse_args(['--out=x', '--corpus_sizes=100,200', '--seeds=0,1,2',
                        '--tasks=ve', '--recipes=cmal,cmcl',
                        '--ablations=mask_only'])
  test = {('cmal', '', 100): [0.5, 0.6, 0.7], ('cmcl', '', 100): [0.4, 0.7, 0.5],
          ('cmal', 'mask_only', 100): [0.5, 0.5, 0.5],
          ('cmal', '', 200): [0.9, 0.9, 0.9]}  # cmcl-200 never finished.
  results = {de.Run('finetune', seed, recipe, corpus, 've', ablation):
             {'metrics': {'test': values[seed]}}
             for (recipe, ablation, corpus), values in test.items()
             for seed in range(3)}
  diffs = de.paired_differences(results, args)
  assert sorted(diffs) == [('ve', 'cmal', 'cmcl', 100),
                           ('ve', 'cmal+mask_only', 'cmal', 100)]
  mean, std, n, wins = diffs[('ve', 'cmal', 'cmcl', 100)]  # +.1, -.1, +.2
  assert (n, wins) == (3, 2)
  assert mean == pytest.approx(0.2 / 3) and std == pytest.approx(
      np.std([0.1, -0.1, 0.2], ddof=1))
  assert diffs[('ve', 'cmal+mask_only', 'cmal', 100)][2:] == (3, 0)


def test_fine_tuning_another_grids_checkpoints(grid_out, tmp_path):
  """--pretrained_from: the same checkpoints under other fine-tuning
  settings, nothing pre-trained again."""
  args = ['--size=tiny', '--seeds=0', '--tasks=ve', '--recipes=cmal',
          '--finetune_steps=2', '--pretrained_lr_mult=1.0',
          '--no-random_init', f'--pretrained_from={grid_out}']
  with pytest.raises(SystemExit, match='has not finished 1 pre-training '
                     r'run\(s\) this grid fine-tunes: pretrain-cmal-512-s0'):
    de.main(args + ['--corpus_sizes=512', f'--out={tmp_path}'])
  tasks = de.main(args + ['--corpus_sizes=256', f'--out={tmp_path}'])
  assert sorted(os.listdir(tmp_path / 'results')) == ['ve-cmal-256-s0.json']
  assert sorted(os.listdir(tmp_path / 'runs')) == ['ve-cmal-256-s0']
  with open(tmp_path / 'runs' / 've-cmal-256-s0' / 'config.json') as f:
    config = json.load(f)
  assert config['init_from'] == str(grid_out / 'runs' /
                                    'pretrain-cmal-256-s0')
  assert config['finetune']['pretrained_lr_mult'] == 1.0
  assert config['total_steps'] == 2
  assert tasks[('ve', 'cmal', 256)][2] == 1
  # The pre-training columns come from the other grid's results.
  with open(grid_out / 'results' / 'pretrain-cmal-256-s0.json') as f:
    amc = json.load(f)['metrics']['amc_pair_acc']
  row = next(line for line in (tmp_path / 'data_efficiency.md').read_text(
      ).splitlines() if line.startswith('| cmal | 256 |'))
  assert f'{amc:.3f}' in row
