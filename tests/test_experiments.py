"""The data-efficiency experiment end to end on `tiny`: its smallest corpus,
one seed, the three region recipes CMAL, CMCL and MLM + ITM, one ablation
and a random init, one task; then a resume that has nothing left to run.
SemVLP and SemMIM are checked without training (their configs, data
folders and table rows): a tiny SemVLP pre-training alone takes ~60 s."""

import json
import os
import re
import subprocess

import numpy as np
import pytest

from cmal_jax import configlib
from cmal_jax.world import synthetic
from cmal_jax.experiments import data_efficiency as de
from cmal_jax.experiments import grid_plan
from cmal_jax.experiments import grid_report
from cmal_jax.experiments import grid_runner
from cmal_jax.model.pixels import reads_pixels
from configs import pretrain

E2E_RECIPES = ('cmal', 'cmcl', 'mlm_itm')
ARGS = ['--size=tiny', '--corpus_sizes=256', '--seeds=0', '--tasks=ve',
        '--pretrain_steps=6', '--finetune_steps=4', '--retrieval_images=8',
        '--ablations=mask_only', '--recipes=' + ','.join(E2E_RECIPES)]


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


@pytest.mark.slow
def test_every_run_leaves_a_result(grid_out):
  names = sorted(os.listdir(grid_out / 'results'))
  assert names == sorted(
      [f'{k}-{r}-256-s0.json' for k in ('pretrain', 've')
       for r in E2E_RECIPES + ('cmal+mask_only',)] + ['ve-random-s0.json'])
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


@pytest.mark.slow
def test_each_result_was_committed_as_it_finished(grid_out):
  log = git(grid_out, 'log', '--format=%s').splitlines()
  assert len(log) == 9 and log[-1] == 'data_efficiency: pretrain-cmal-256-s0'
  assert git(grid_out, 'ls-files').split() == sorted(
      f'results/{f}' for f in os.listdir(grid_out / 'results'))


@pytest.mark.slow
def test_table_and_plot_are_written(grid_out):
  for folder in (grid_out, grid_out / 'docs'):
    text = (folder / 'data_efficiency.md').read_text()
    assert '9 of 9 runs finished' in text
    for recipe in E2E_RECIPES:
      assert f'| {recipe} | 256 | ' in text
    assert '| random init | - | ' in text
    blind = grid_report.blind_baselines(grid_out,
                                        de.parse_args(ARGS + ['--out=x']))
    assert blind['ve'][2] == 1 and 0 < blind['ve'][0] < 1
    assert f"| blind baseline | - | {blind['ve'][0]:.3f} |" in text
    assert '| cmal+mask_only | 256 | ' in text
    assert '| cmal - cmcl | 256 | ' in text
    assert '| cmal+mask_only - cmal | 256 | ' in text
    assert (folder / 'data_efficiency.png').stat().st_size > 5000
    assert len(json.loads((folder / 'data_efficiency.json').read_text())) == 9


@pytest.mark.slow
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
      (kind, ablation): grid_plan.run_config(
          grid_plan.Run(kind, 0, 'cmal', 2000, 'pretrain' if kind == 'pretrain'
                        else 've', ablation), args, 'x')
      for kind in ('pretrain', 'finetune')
      for ablation in ('', 'no_hypersphere', 'mask_only', 'paper')}
  assert configs['pretrain', ''].model.hypersphere
  # 'paper': the four shortcut fixes off (configs/pretrain.py).
  for field, value in pretrain.PAPER_BEHAVIOUR.items():
    section, name = field.split('.')
    assert configs['pretrain', 'paper'][section][name] == value
    assert configs['pretrain', ''][section][name] != value
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
    summary = grid_plan.summarise(run, results, 1.0)
    os.makedirs(os.path.join(out, 'results'), exist_ok=True)
    with open(grid_plan.result_path(out, run), 'w') as f:
      json.dump(summary, f)
    return summary

  monkeypatch.setattr(grid_runner, 'execute', fake_execute)
  monkeypatch.setattr(grid_runner, 'prepare_data', lambda *a: None)
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
  results = {grid_plan.Run('finetune', seed, recipe, corpus, 've', ablation):
             {'metrics': {'test': values[seed]}}
             for (recipe, ablation, corpus), values in test.items()
             for seed in range(3)}
  diffs = grid_report.paired_differences(results, args)
  assert sorted(diffs) == [('ve', 'cmal', 'cmcl', 100),
                           ('ve', 'cmal+mask_only', 'cmal', 100)]
  mean, std, n, wins = diffs[('ve', 'cmal', 'cmcl', 100)]  # +.1, -.1, +.2
  assert (n, wins) == (3, 2)
  assert mean == pytest.approx(0.2 / 3) and std == pytest.approx(
      np.std([0.1, -0.1, 0.2], ddof=1))
  assert diffs[('ve', 'cmal+mask_only', 'cmal', 100)][2:] == (3, 0)


@pytest.mark.slow
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


def test_semvlp_and_semmim_runs_build_their_own_models_and_data():
  """Each recipe pre-trains and fine-tunes its own model (the fine-tuning
  config of its recipe); SemMIM reads pixels, from folders with images of
  their own, so the region recipes keep theirs."""
  args = de.parse_args(['--out=x', '--size=tiny', '--corpus_sizes=2000',
                        '--seeds=0', '--tasks=ve,rec'])
  assert args.recipes == de.RECIPES  # The default: every recipe.
  configs = {r.name: grid_plan.run_config(r, args, 'x')
             for r in grid_plan.grid(args)}
  assert sorted(configs) == sorted(
      [f'{k}-{r}-2000-s0' for k in ('pretrain', 've', 'rec')
       for r in de.RECIPES] + ['ve-random-s0', 'rec-random-s0'])
  for config in configs.values():
    configlib.validate(config)
  for task in ('pretrain', 've', 'rec'):
    name = lambda recipe: (f'{task}-{recipe}-2000-s0' if recipe != 'random'
                           else f'{task}-random-s0')
    cmal, semvlp, semmim = (configs[name(r)] for r in (
        'cmal', 'semvlp', 'semmim'))
    assert semvlp.model.cross_attention and not cmal.model.cross_attention
    assert not semvlp.model.two_stream  # Fine-tuning: single-stream.
    assert reads_pixels(semmim)
    assert not reads_pixels(cmal) and not reads_pixels(
        semvlp)
    # Region recipes share the folders (and names) of the finished grid.
    folder = ('pretrain-2000-s0' if task == 'pretrain' else f'{task}-s0')
    assert cmal.data.dir == semvlp.data.dir == os.path.join(
        'x', 'data', folder)
    assert semmim.data.dir == os.path.join('x', 'data', folder + '-pixels')
    if task != 'pretrain':
      assert semmim.init_from == os.path.join(
          'x', 'runs', 'pretrain-semmim-2000-s0')
      assert semmim.model.visual.boxes == 'given'  # The records' boxes.
      random = configs[name('random')]  # CMAL's model, on regions.
      assert random.init_from == '' and not reads_pixels(random)
      assert not random.model.cross_attention
      assert random.data.dir == cmal.data.dir


@pytest.mark.parametrize('run', [
    grid_plan.Run('pretrain', 0, 'semmim', 256),
    grid_plan.Run('finetune', 0, 'semmim', 256, 've')])
def test_a_pixel_run_refuses_a_data_folder_without_images(tmp_path, run):
  """synthetic.check_images, which the world's and the tasks' generators
  both run first: a pixel config on a folder of region-only data."""
  args = de.parse_args(['--out=x', '--size=tiny', '--recipes=semmim'])
  config = grid_plan.run_config(run, args, str(tmp_path))
  os.makedirs(config.data.dir)
  with open(os.path.join(config.data.dir, 'meta.json'), 'w') as f:
    json.dump({'generator': {'images': False}}, f)
  with pytest.raises(ValueError, match=re.escape(
      f'{config.data.dir} holds synthetic data without images, and this '
      f'{config.task} run reads pixels')):
    grid_runner.prepare_data(config)
  with open(os.path.join(config.data.dir, 'meta.json'), 'w') as f:
    json.dump({'generator': {'images': True}}, f)
  synthetic.check_images(config, config.data.dir)  # Accepted.


def test_new_recipes_join_a_finished_grid(tmp_path, monkeypatch, capsys):
  """--recipes=semvlp,semmim on an OUT holding CMAL's and CMCL's results:
  only the new runs run (data prepared first, the pixel folders too), and
  the table shows every recipe with CMAL paired against each."""
  prepared, executed = {}, []

  def fake_execute(run, args, out):
    executed.append(run.name)
    config = grid_plan.run_config(run, args, out)
    assert prepared[config.data.dir] == reads_pixels(config)
    test = {'cmal': 0.6, 'cmcl': 0.5, 'semvlp': 0.45, 'semmim': 0.4,
            'random': 0.3}[run.recipe]
    # No AMC metrics but for CMAL's (summarise keeps what there is).
    results = ({'itm_acc': 0.7, 'itm_acc_label_blind': 0.55, 'mlm_acc': 0.2,
                **({'amc_pair_acc': 0.9} if run.recipe == 'cmal' else {})}
               if run.kind == 'pretrain' else
               {'val': {'accuracy': test}, 'test': {'accuracy': test},
                'best_step': 4})
    summary = grid_plan.summarise(run, results, 1.0)
    os.makedirs(os.path.join(out, 'results'), exist_ok=True)
    with open(grid_plan.result_path(out, run), 'w') as f:
      json.dump(summary, f)
    return summary

  monkeypatch.setattr(grid_runner, 'execute', fake_execute)
  monkeypatch.setattr(grid_runner, 'prepare_data',
                      lambda c: prepared.setdefault(
                          c.data.dir, reads_pixels(c)))
  common = ['--out', str(tmp_path), '--corpus_sizes=256', '--seeds=0',
            '--tasks=ve']
  de.main(common + ['--recipes=cmal,cmcl'])
  prepared.clear()
  executed.clear()
  de.main(common + ['--recipes=semvlp,semmim'])
  # The random init's result is the first grid's (by name).
  assert executed == ['pretrain-semvlp-256-s0', 'pretrain-semmim-256-s0',
                      've-semvlp-256-s0', 've-semmim-256-s0']
  data = str(tmp_path / 'data')
  assert prepared == {  # Folder -> whether its config read pixels.
      os.path.join(data, 'pretrain-256-s0'): False,
      os.path.join(data, 'pretrain-256-s0-pixels'): True,
      os.path.join(data, 've-s0'): False,
      os.path.join(data, 've-s0-pixels'): True}
  text = (tmp_path / 'data_efficiency.md').read_text()
  assert 'CMAL vs CMCL vs SemMIM vs SemVLP (tiny)' in text
  assert ('5 of 5 runs finished (and 4 finished run(s) of cmal, cmcl '
          'already in this folder)') in text
  # AMC pairing, place-only control, its chance, ITM, label-blind, R@1.
  assert '| cmal | 256 | 0.600 | 0.900 | - | - | 0.700 | 0.550 | - |' in text
  assert '| semvlp | 256 | 0.450 | - | - | - | 0.700 | 0.550 | - |' in text
  assert '| semmim | 256 | 0.400 | - | - | - | 0.700 | 0.550 | - |' in text
  for other, diff in (('cmcl', 0.1), ('semvlp', 0.15), ('semmim', 0.2)):
    assert f'| cmal - {other} | 256 | +{diff:.3f} ± 0.000 (1/1) |' in text
  assert '5 runs, 1 done, 4 to go.' in capsys.readouterr().out
