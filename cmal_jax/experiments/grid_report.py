"""The data-efficiency grid's write-up (data_efficiency.py): its finished
runs' results folded into tables (mean ± std over seeds, paired
differences by seed, the blind baseline of each task), written as
data_efficiency.md / .json and plotted as data_efficiency.png."""

import json
import math
import os

from matplotlib.figure import Figure

from cmal_jax.data.tasks import task_path
from cmal_jax.experiments.grid_plan import (
    TASK_METRIC, data_folder, pretrain_out, result_path)
from cmal_jax.world import task_baselines

# The pre-training metrics of the table, each beside its control
# (docs/controls.md): key in the pre-training result, column header.
PRETRAIN_COLUMNS = (
    ('amc_pair_acc', 'AMC pairing'),
    ('amc_pair_acc_place_only', 'pairing, place only (control)'),
    ('amc_pair_chance_place_only', 'its chance'),
    ('itm_acc', 'ITM'),
    ('itm_acc_label_blind', 'ITM label-blind (control)'),
    ('retrieval_t2i_r1', 'zero-shot R@1 t2i'))


def load_results(out, runs):
  results = {}
  for run in runs:
    path = result_path(out, run)
    if os.path.exists(path):
      with open(path) as f:
        results[run] = json.load(f)
  return results


def mean_std(values):
  if not values:
    return float('nan'), float('nan')
  m = sum(values) / len(values)
  sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if (
      len(values) > 1) else 0.0
  return m, sd


def table(results, args):
  """{(task, recipe, corpus): (mean, std, n)} of the test metrics, and the
  pre-training metrics {(recipe, corpus): {metric: (mean, std, n)}}."""
  tasks, pre = {}, {}
  for run, r in results.items():
    key = (run.init, run.corpus)
    if run.kind == 'pretrain':
      for k, v in r['metrics'].items():
        pre.setdefault(key, {}).setdefault(k, []).append(v)
    else:
      tasks.setdefault((run.task,) + key, []).append(r['metrics']['test'])
  fold = lambda vs: (*mean_std(vs), len(vs))
  return ({k: fold(v) for k, v in tasks.items()},
          {k: {m: fold(v) for m, v in d.items()} for k, d in pre.items()})


def blind_baselines(out, args):
  """{task: (mean, std, n)}: the score of a model that never sees the image
  (task_baselines.blind_baseline, priors from train) on each seed's test
  split, for the tasks whose data this grid has."""
  scores = {}
  for task in args.tasks:
    for seed in args.seeds:
      # The same examples either way; the pixel folder when only recipes
      # that read pixels ran.
      folder = next((f for f in (data_folder(out, task, seed, pixels=p)
                                 for p in (False, True))
                     if os.path.exists(task_path(f, task, 'test'))),
                    None)
      if folder is None:
        continue  # Not generated (yet).
      scores.setdefault(task, []).append(
          task_baselines.blind_baseline_of(folder, task, ('test',))['test'])
  return {t: (*mean_std(v), len(v)) for t, v in scores.items()}


def paired_differences(results, args):
  """Test-metric differences between two inits fine-tuned with the same seed:
  {(task, a, b, corpus): (mean, std, n, wins of a)}, a - b, for CMAL against
  each other recipe at every corpus size and for each ablation against CMAL
  on the smallest corpus. Pairing by seed removes what a seed's data and
  fine-tuning draws share."""
  by = {}
  for run, r in results.items():
    if run.kind == 'finetune':
      by[(run.task, run.init, run.corpus, run.seed)] = r['metrics']['test']
  pairs = [('cmal', other, c) for other in args.recipes if other != 'cmal'
           for c in args.corpus_sizes]
  pairs += [(f'cmal+{a}', 'cmal', min(args.corpus_sizes))
            for a in args.ablations]
  diffs = {}
  for task in args.tasks:
    for a, b, corpus in pairs:
      d = [by[(task, a, corpus, s)] - by[(task, b, corpus, s)]
           for s in args.seeds if (task, a, corpus, s) in by
           and (task, b, corpus, s) in by]
      if d:
        diffs[(task, a, b, corpus)] = (*mean_std(d), len(d),
                                       sum(x > 0 for x in d))
  return diffs


def write_report(out, runs, results, args, *, title, status):
  """OUT/data_efficiency.md, .json and .png (and the same in --docs when
  given) of `results` ({run: result}, the grid's and those of `runs`);
  title names the recipes, status says how many runs finished. Returns the
  task table."""
  tasks, pre = table(results, args)
  if args.pretrained_from:  # Their pre-training metrics, for the table.
    pre = table(load_results(pretrain_out(args, out), {
        r.pretrain for r in runs if r.recipe != 'random'}), args)[1]
  fmt = lambda t: (f'{t[0]:.3f} ± {t[1]:.3f}' if t[2] > 1 else
                   f'{t[0]:.3f}') if t else '-'
  lines = [f'# Data efficiency: {title} ({args.size})', '',
           f'{status}; seeds {list(args.seeds)}; ' + (
               f'pre-training runs of {args.pretrained_from}' if
               args.pretrained_from else
               f'pre-training {args.pretrain_steps or "default"} steps')
           + f', fine-tuning {args.finetune_steps or "default"} steps, '
           f'batch {args.batch_size or "default"}. Test metric, mean ± std '
           'over seeds.', '',
           '| recipe | corpus | ' + ' | '.join(
               f'{t} ({TASK_METRIC[t]})' for t in args.tasks)
           + ' | ' + ' | '.join(h for _, h in PRETRAIN_COLUMNS) + ' |',
           '|---|---|' + '---|' * (len(args.tasks) + len(PRETRAIN_COLUMNS))]
  no_pretrain = ' | -' * len(PRETRAIN_COLUMNS) + ' |'
  blind = blind_baselines(out, args)
  lines.append('| blind baseline | - | ' + ' | '.join(
      fmt(blind.get(t)) for t in args.tasks) + no_pretrain)
  if args.random_init:
    lines.append('| random init | - | ' + ' | '.join(
        fmt(tasks.get((t, 'random', 0))) for t in args.tasks) + no_pretrain)
  rows = [(r, c) for r in args.recipes for c in args.corpus_sizes]
  rows += [(f'cmal+{a}', min(args.corpus_sizes)) for a in args.ablations]
  for recipe, corpus in rows:  # A recipe (or ablation) and corpus size.
    p = pre.get((recipe, corpus), {})
    lines.append(f'| {recipe} | {corpus} | ' + ' | '.join(
        fmt(tasks.get((t, recipe, corpus))) for t in args.tasks) + ' | '
        + ' | '.join(fmt(p.get(m)) for m, _ in PRETRAIN_COLUMNS) + ' |')
  diffs = paired_differences(results, args)
  if diffs:
    lines += ['', 'Paired by seed: test metric of the first init minus the '
              'second, mean ± std over seeds (wins: seeds where the first is '
              'higher).', '', '| first - second | corpus | ' + ' | '.join(
                  args.tasks) + ' |', '|---|---|' + '---|' * len(args.tasks)]
    for a, b, corpus in dict.fromkeys(k[1:] for k in diffs):
      cells = []
      for task in args.tasks:
        d = diffs.get((task, a, b, corpus))
        cells.append(f'{d[0]:+.3f} ± {d[1]:.3f} ({d[3]}/{d[2]})' if d
                     else '-')
      lines.append(f'| {a} - {b} | {corpus} | ' + ' | '.join(cells) + ' |')
  lines += ['', 'Produced by:', '', '    python -m '
            'cmal_jax.experiments.data_efficiency ' + ' '.join(args.argv), '']
  text = '\n'.join(lines)
  targets = [out] + ([args.docs] if args.docs else [])
  for folder in targets:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'data_efficiency.md'), 'w') as f:
      f.write(text)
    with open(os.path.join(folder, 'data_efficiency.json'), 'w') as f:
      json.dump([r for r in results.values()], f, indent=1)
    plot(tasks, blind, args, os.path.join(folder, 'data_efficiency.png'))
  print(text, flush=True)
  return tasks


def plot(tasks, blind, args, path):
  """Each task's test metric against the corpus size, one line per recipe
  (a Figure of its own: no pyplot state, no display needed)."""
  fig = Figure(figsize=(4 * len(args.tasks), 3.2))
  axes = fig.subplots(1, len(args.tasks), squeeze=False)
  for ax, task in zip(axes[0], args.tasks):
    for recipe in args.recipes:
      points = [(c, tasks[(task, recipe, c)]) for c in args.corpus_sizes
                if (task, recipe, c) in tasks]
      if points:
        xs = [c for c, _ in points]
        ys = [t[0] for _, t in points]
        err = [t[1] for _, t in points]
        ax.errorbar(xs, ys, yerr=err, marker='o', capsize=3, label=recipe)
    if (task, 'random', 0) in tasks:
      ax.axhline(tasks[(task, 'random', 0)][0], color='grey', ls='--',
                 label='random init')
    if task in blind:
      ax.axhline(blind[task][0], color='grey', ls=':', label='blind baseline')
    ax.set_xscale('log')
    ax.minorticks_off()
    ax.set_xticks(args.corpus_sizes, [f'{c / 1000:g}k' if c >= 1000 else
                                      str(c) for c in args.corpus_sizes])
    ax.set_xlabel('pre-training pairs')
    ax.set_title(f'{task} test {TASK_METRIC[task]}')
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)

