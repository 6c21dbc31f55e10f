"""A run's report from its workdir: config changes against the defaults,
final training metrics, evaluation, data counters, throughput, and loss and
accuracy curves (PNG, written into the workdir).

  python -m cmal_jax.report --workdir=runs/pretrain [--no-plots]
  python -m cmal_jax.report --table 'fixed=runs/fixed_s*/eval.json' \
      'paper=runs/paper_s*/eval.json' --metrics=amc_pair_acc,itm_acc

  python -m cmal_jax.report --curves 'pretrained=runs/vqa_pre_s*' \
      'random=runs/vqa_s*' 'baseline=runs/baseline/vqa_regions_s*.json' \
      --metric=vqa_accuracy --out=docs/curves_vqa.png

The second form prints a Markdown table of eval.json metrics, one column per
setting, each cell the mean ± std over the setting's files (its seeds); a
metric may name a split's entry, 'test/vqa_accuracy'. The third plots the
eval split's metric against steps, one line per setting (the mean over its
runs, a band of ± std): fine-tuning workdirs (their eval/ lines) or
one-hour baseline results (their val_curve), with the blind baseline.

Reads config.json, metrics.jsonl, eval.json and best.json as train.py writes
them; a missing file is reported as missing, a malformed one raises a
ValueError naming the file (and line).
"""

import argparse
import glob
import json
import math
import os
import re
import textwrap

from flax import traverse_util

from cmal_jax import cli_errors, config_base

CONFIG, METRICS, EVAL, BEST = ('config.json', 'metrics.jsonl', 'eval.json',
                               'best.json')
# Entries of eval.json (and eval/* lines) that are not evaluation metrics.
NOT_EVAL_METRICS = ('step', 'data_stats', 'nonfinite_skips')


# ---------------------------------------------------------------- reading

def read_json(path):
  """The JSON object in `path`, or None when the file does not exist."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    try:
      value = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: not valid JSON ({e})') from None
  if not isinstance(value, dict):
    raise ValueError(f'{path}: expected a JSON object, got '
                     f'{type(value).__name__}')
  return value


def read_metrics(path):
  """The lines of a metrics.jsonl as dicts, or None when it does not exist.

  Blank lines are skipped, and so is an unterminated last line (what a run
  killed mid-write leaves; the resumed run drops it too). Any other line
  that is not a JSON object with a 'step' raises ValueError naming the file
  and line number.
  """
  if not os.path.exists(path):
    return None
  lines = []
  with open(path) as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        if not line.endswith('\n'):  # Cut off by a kill: not an error.
          break
        raise ValueError(f'{path}: line {number}: not valid JSON '
                         f'({e.msg})') from None
      if not isinstance(record, dict) or not isinstance(
          record.get('step'), (int, float)):
        raise ValueError(f'{path}: line {number}: expected a JSON object '
                         "with a numeric 'step'")
      lines.append(record)
  return lines


def training_lines(lines):
  return [m for m in lines or () if 'loss' in m]


def eval_lines(lines):
  return [m for m in lines or () if any(k.startswith('eval/') for k in m)]


def is_number(v):
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_score(name):
  """Accuracies and recalls (higher is better), not counts like num_pairs."""
  return ('acc' in name or 'recall' in name
          or re.search(r'_r\d+$', name) is not None)


def default_config(config):
  """The defaults of the run's config file and argument, as config.json
  would hold them (tuples become lists)."""
  task, size = config.get('task', 'pretrain'), config.get('size', 'small')
  if task == 'pretrain':
    default = config_base.config_module('pretrain').get_config(
        f'{size},{config.get("recipe", "cmal")}')
  else:
    default = config_base.config_module('finetune').get_config(
        f'{task},{size},{config.get("pretrain_recipe", "cmal")}')
  return json.loads(default.to_json_best_effort())


# ------------------------------------------------------------- formatting

def fmt(value):
  """A metric for a table: 4 decimals, or scientific when tiny or huge."""
  if not is_number(value) or isinstance(value, int):
    return str(value)
  if value != 0 and math.isfinite(value) and not 1e-3 <= abs(value) < 1e4:
    return f'{value:.4e}'
  return f'{value:.4f}'


def fmt_count(value):
  """A count without decimals (MetricWriter writes every scalar as a float);
  anything not a whole number as fmt does."""
  if is_number(value) and math.isfinite(value) and value == int(value):
    return str(int(value))
  return fmt(value)


def table(header, rows, indent='  '):
  """Fixed-width columns, separated by two spaces."""
  rows = [tuple(str(c) for c in row) for row in rows]
  widths = [max(len(row[i]) for row in [header] + rows)
            for i in range(len(header))]
  def line(row):
    return indent + '  '.join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
  return [line(header), line(tuple('-' * w for w in widths))] + [
      line(row) for row in rows]


# --------------------------------------------------------------- sections

def run_section(workdir, config, lines, evaluation, best):
  train = training_lines(lines)
  steps = [m['step'] for m in train]
  if evaluation and is_number(evaluation.get('step')):
    steps.append(evaluation['step'])
  done = int(max(steps)) if steps else 0
  total = config.get('total_steps', '?') if config else '?'
  note = ''
  if is_number(total) and done < total:
    note = '  (stopped before total_steps)'
  files = [(name, 'missing' if value is None else 'ok') for name, value in
           ((CONFIG, config), (METRICS, lines), (EVAL, evaluation),
            (BEST, best))]
  if lines is not None:
    files[1] = (METRICS, f'ok ({len(train)} training, '
                         f'{len(eval_lines(lines))} eval lines)')
  size = config.get('size', '?') if config else '?'
  recipe = config.get('recipe', '?') if config else '?'
  rows = [('size/recipe', f'{size}/{recipe}'),
          ('steps', f'{done} / {total}{note}')] + files
  width = max(len(label) for label, _ in rows)
  return [f'Run report: {os.path.abspath(workdir)}'] + [
      f'  {label:<{width}}  {value}' for label, value in rows]


def config_section(config):
  out = ['Config vs defaults']
  if config is None:
    return out + [f'  ({CONFIG} missing)']
  size, recipe = config.get('size', 'small'), config.get('recipe', 'cmal')
  task = config.get('task', 'pretrain')
  out[0] += f' ({size},{recipe})' if task == 'pretrain' else f' ({task},{size})'
  try:
    default = traverse_util.flatten_dict(default_config(config), sep='.')
  except (ImportError, ValueError) as e:
    return out + [f'  (no default config to compare with: {e})']
  value = traverse_util.flatten_dict(config, sep='.')
  rows = [(k, repr(default[k]), repr(value[k])) for k in sorted(value)
          if k in default and value[k] != default[k]]
  out += table(('key', 'default', 'value'), rows) if rows else [
      '  (no differences)']
  for note, keys in (
      ('extra keys (not in the defaults, ignored)', set(value) - set(default)),
      (f'keys missing from {CONFIG}', set(default) - set(value))):
    if keys:
      out += textwrap.wrap(f'{note}: {", ".join(sorted(keys))}', width=79,
                           initial_indent='  ', subsequent_indent='    ',
                           break_on_hyphens=False)
  return out


def training_section(lines):
  train = training_lines(lines)
  if not train:
    return ['Final training metrics', '  (no training lines)']
  last = train[-1]
  names = (['loss'] + sorted(k for k in last if k.startswith('loss_')) +
           sorted(k for k in last if k.startswith('acc_')))
  rows = [(k, fmt(last[k])) for k in names]
  if 'lr' in last:
    rows.append(('lr', f'{last["lr"]:.3e}'))
  if 'grad_norm' in last:
    rows.append(('grad_norm', fmt(last['grad_norm'])))
  return ([f'Final training metrics (step {int(last["step"])})'] +
          table(('metric', 'value'), rows))


def final_eval(lines, evaluation):
  """(title, {metric: value}) of the final evaluation, or (title, None)."""
  if evaluation is not None:
    # Fine-tuning nests one dict per split: 'test/accuracy'.
    flat = traverse_util.flatten_dict(
        {k: v for k, v in evaluation.items() if k not in NOT_EVAL_METRICS},
        sep='/')
    values = {k: v for k, v in flat.items() if is_number(v)}
    step = evaluation.get('step', '?')
    return f'Final evaluation ({EVAL}, step {step})', values
  evals = eval_lines(lines)
  if not evals:
    return 'Final evaluation', None
  last = evals[-1]
  values = {k[5:]: v for k, v in last.items() if k.startswith('eval/')
            and k[5:] not in NOT_EVAL_METRICS and is_number(v)}
  return (f'Last evaluation ({METRICS}, step {int(last["step"])}; {EVAL} '
          'missing)'), values


def eval_section(lines, evaluation):
  title, values = final_eval(lines, evaluation)
  if values is None:
    return [title, '  (no evaluation yet)']
  rows = [(k, fmt(v) if is_score(k) else fmt_count(v))
          for k, v in sorted(values.items())]
  return [title] + table(('metric', 'value'), rows)


def best_per_metric(lines):
  """{metric: (max value, its first step)} over the eval/* lines' scores."""
  best = {}
  for m in eval_lines(lines):
    for key, value in m.items():
      name = key[5:]
      if not key.startswith('eval/') or not is_number(value) or (
          not is_score(name)) or math.isnan(value):
        continue
      if name not in best or value > best[name][0]:
        best[name] = (value, int(m['step']))
  return best


def best_section(lines, best):
  if best is not None:
    return ['Best evaluation', f'  {BEST}: {best.get("metric")} = '
            f'{fmt(best.get("value"))} at step {best.get("step")}']
  per_metric = best_per_metric(lines)
  if not per_metric:
    return ['Best evaluation', f'  ({BEST} missing, no eval lines)']
  rows = [(k, fmt(v), s) for k, (v, s) in sorted(per_metric.items())]
  return [f'Best evaluation (max over {METRICS} eval lines; {BEST} missing)'
         ] + table(('metric', 'best', 'step'), rows)


def data_section(lines, evaluation):
  train = training_lines(lines)
  last = train[-1] if train else {}
  counters = {k[5:]: v for k, v in last.items() if k.startswith('data/')}
  skips = last.get('nonfinite_skips')
  if not counters and evaluation:  # No training line: eval.json has them.
    counters = dict(evaluation.get('data_stats') or {})
    skips = evaluation.get('nonfinite_skips')
  if not counters and skips is None:
    return ['Data counters', '  (none recorded)']
  examples = counters.get('examples')
  rows = []
  for name in sorted(counters):
    share = ''
    if name.startswith('skipped') and examples:
      share = f'{100 * counters[name] / examples:.2f}%'
    rows.append((name, fmt_count(counters[name]), share))
  if skips is not None:
    rows.append(('nonfinite_skips', fmt_count(skips), ''))
  return ['Data counters (cumulative)'] + table(
      ('counter', 'value', 'share of examples'), rows)


def throughput_section(lines):
  train = training_lines(lines)
  title = 'Throughput (mean over training lines, first excluded: compilation)'
  if not train:
    return ['Throughput', '  (no training lines)']
  window = train[1:]
  if not window:
    title = 'Throughput (only one training line; includes compilation)'
    window = train
  rows = []
  for key in ('steps_per_sec', 'examples_per_sec'):
    values = [m[key] for m in window if is_number(m.get(key))]
    if values:
      rows.append((key, f'{sum(values) / len(values):.2f}', len(values)))
  if not rows:
    return ['Throughput', '  (not recorded)']
  return [title] + table(('metric', 'mean', 'lines'), rows)


def summarize(workdir):
  """The report as text. Raises FileNotFoundError if `workdir` is not a
  directory and ValueError if one of its files is malformed."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'{workdir}: no such directory')
  config = read_json(os.path.join(workdir, CONFIG))
  lines = read_metrics(os.path.join(workdir, METRICS))
  evaluation = read_json(os.path.join(workdir, EVAL))
  best = read_json(os.path.join(workdir, BEST))
  sections = [run_section(workdir, config, lines, evaluation, best),
              config_section(config)]
  if lines is None:
    sections.append([f'{METRICS} missing: no training metrics, curves or '
                     'throughput.'])
  else:
    sections.append(training_section(lines))
  sections += [eval_section(lines, evaluation), best_section(lines, best),
               data_section(lines, evaluation)]
  if lines is not None:
    sections.append(throughput_section(lines))
  return '\n\n'.join('\n'.join(s) for s in sections) + '\n'


# ------------------------------------------------------------------ plots

def series(lines, key):
  """(steps, values) of the lines that have `key`."""
  points = [(m['step'], m[key]) for m in lines if is_number(m.get(key))]
  return [p[0] for p in points], [p[1] for p in points]


def plot_curves(workdir):
  """Writes curves_loss.png and curves_accuracy.png into `workdir`; returns
  the paths written (none without training lines)."""
  lines = read_metrics(os.path.join(workdir, METRICS))
  train, evals = training_lines(lines), eval_lines(lines)
  if not train:
    return []
  import matplotlib  # Imported lazily: heavy, and only the plots need it.
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  keys = sorted({k for m in train for k in m})
  losses = ['loss'] + [k for k in keys if k.startswith('loss_')]
  accs = [k for k in keys if k.startswith('acc_')]
  eval_accs = sorted({k for m in evals for k in m
                      if k.startswith('eval/') and 'acc' in k})
  written = []
  for filename, ylabel, curves, points in (
      ('curves_loss.png', 'loss', losses, []),
      ('curves_accuracy.png', 'accuracy', accs, eval_accs)):
    if not curves and not points:
      continue
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=100)
    colors = {}
    for key in curves:
      line, = ax.plot(*series(train, key), label=key,
                      linewidth=2.0 if key == 'loss' else 1.2)
      colors[key] = line.get_color()
    for key in points:
      # eval/mlm_acc in the colour of acc_mlm, so the two read together;
      # the all-swapped variants as hollow squares of the same colour.
      metric = key[len('eval/'):]
      swapped = metric.endswith('_all_swapped')
      twin = 'acc_' + metric.removesuffix('_all_swapped').removesuffix('_acc')
      ax.plot(*series(evals, key), 's' if swapped else 'o', markersize=6,
              fillstyle='none' if swapped else 'full', label=key,
              color=colors.get(twin))
    ax.set_xlabel('step')
    ax.set_ylabel(ylabel)
    ax.set_title(f'{ylabel}: {os.path.basename(os.path.abspath(workdir))}')
    ax.grid(alpha=0.3)
    ax.legend(fontsize='small', loc='upper left', bbox_to_anchor=(1.01, 1))
    path = os.path.join(workdir, filename)
    fig.savefig(path, bbox_inches='tight')
    plt.close(fig)
    written.append(path)
  return written


# ------------------------------------------------------------ seed table

def metric_of(results, name):
  """results[name], or for 'split/metric' results[split][metric]; None
  where it is missing."""
  for key in name.split('/'):
    if not isinstance(results, dict) or key not in results:
      return None
    results = results[key]
  return results


def seed_table(columns, metrics):
  """Markdown table: one row per metric, one column per setting; columns
  {name: [eval.json paths]} (one per seed). A metric is a key of the file
  or 'split/key'. A cell is the mean ± std (population std) over the files,
  or 'n/a' where no file has the metric; the header says how many files
  each column has."""
  runs = {name: [read_json(p) for p in paths] for name, paths in
          columns.items()}
  lines = ['| metric | ' + ' | '.join(
      f'{name} (n={len(r)})' for name, r in runs.items()) + ' |',
           '|---' * (len(runs) + 1) + '|']
  for metric in metrics:
    cells = []
    for r in runs.values():
      values = [v for v in (metric_of(e, metric) for e in r)
                if is_number(v)]
      if not values:
        cells.append('n/a')
        continue
      mean = sum(values) / len(values)
      std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
      cells.append(f'{mean:.3f} ± {std:.3f}' if len(values) > 1
                   else f'{mean:.3f}')
    lines.append(f'| {metric} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


# --------------------------------------------------------- learning curves

def val_curve(path, metric):
  """One run's eval-split `metric` against steps, and its blind baseline
  there: ((steps, values), blind or None). `path` is a fine-tuning workdir
  (metrics.jsonl's eval/ lines, eval.json's blind_baseline) or a one-hour
  baseline result JSON (val_curve, blind_baseline)."""
  if os.path.isdir(path):
    lines = read_metrics(os.path.join(path, METRICS))
    if lines is None:
      raise FileNotFoundError(f'{path}: no {METRICS}')
    evaluation = read_json(os.path.join(path, EVAL)) or {}
    points = series(eval_lines(lines), f'eval/{metric}')
    blind = metric_of(evaluation, 'val/blind_baseline')
  else:
    result = read_json(path)
    if result is None or 'val_curve' not in result:
      raise ValueError(f'{path}: not a one-hour baseline result with a '
                       'val_curve')
    points = ([s for s, _ in result['val_curve']],
              [v for _, v in result['val_curve']])
    blind = metric_of(result, f'blind_baseline/{result["val_split"]}')
  if not points[0]:
    raise ValueError(f'{path}: no evaluation of {metric}')
  return points, blind


def mean_curve(curves):
  """Runs' (steps, values) -> (steps every run has, mean, population std)."""
  steps = sorted(set.intersection(*(set(s) for s, _ in curves)))
  at = [dict(zip(s, v)) for s, v in curves]
  means, stds = [], []
  for step in steps:
    values = [a[step] for a in at]
    mean = sum(values) / len(values)
    means.append(mean)
    stds.append(math.sqrt(sum((v - mean) ** 2 for v in values)
                          / len(values)))
  return steps, means, stds


def plot_learning_curves(columns, metric, out):
  """Writes `out` (PNG): per setting {name: [paths]} the mean of its runs'
  eval `metric` against steps with a ± std band, and the blind baseline
  (dashed). Returns {name: (steps, means, stds)}."""
  import matplotlib  # Lazily, as plot_curves.
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
  drawn, blinds = {}, []
  for name, paths in columns.items():
    read = [val_curve(p, metric) for p in paths]
    blinds += [b for _, b in read if b is not None]
    steps, means, stds = drawn[name] = mean_curve([c for c, _ in read])
    line, = ax.plot(steps, means, marker='o', markersize=3,
                    label=f'{name} (n={len(paths)})')
    ax.fill_between(steps, [m - s for m, s in zip(means, stds)],
                    [m + s for m, s in zip(means, stds)],
                    color=line.get_color(), alpha=0.2)
  if blinds:
    ax.axhline(sum(blinds) / len(blinds), color='grey', linestyle='--',
               label='blind baseline')
  ax.set_xlabel('step')
  ax.set_ylabel(f'{metric} (eval split)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize='small')
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, bbox_inches='tight')
  plt.close(fig)
  return drawn


# -------------------------------------------------------------------- CLI

def settings(parser, flag, specs):
  """['NAME=GLOB', ...] -> {NAME: sorted matches}; an empty match fails."""
  columns = {}
  for spec in specs:
    name, sep, pattern = spec.partition('=')
    if not sep:
      parser.error(f'{flag} {spec!r}: expected NAME=GLOB')
    columns[name] = sorted(glob.glob(pattern))
    if not columns[name]:
      raise FileNotFoundError(f'{flag} {name}: no file matches')
  return columns


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog='python -m cmal_jax.report',
      description='Summarises a run and plots its loss and accuracy curves.')
  parser.add_argument('--workdir', help='The run directory.')
  parser.add_argument('--no-plots', action='store_true',
                      help='Only print the summary.')
  parser.add_argument('--table', nargs='+', metavar='NAME=GLOB',
                      help='Instead of a run: a table of eval.json files, '
                      'one column per NAME, mean ± std over GLOB\'s files.')
  parser.add_argument('--metrics', default='',
                      help='With --table: comma-separated eval.json keys '
                      '(split/key for a split\'s).')
  parser.add_argument('--curves', nargs='+', metavar='NAME=GLOB',
                      help='Instead of a run: plot learning curves, one line '
                      'per NAME over GLOB\'s workdirs or baseline results.')
  parser.add_argument('--metric', default='',
                      help='With --curves: the eval metric, e.g. '
                      'vqa_accuracy.')
  parser.add_argument('--out', default='',
                      help='With --curves: the PNG to write.')
  cli_errors.add_verbose_flag(parser)
  args = parser.parse_args(argv)
  if sum(x is not None for x in (args.workdir, args.table, args.curves)) != 1:
    parser.error('give one of --workdir, --table or --curves')
  if args.table:
    if not args.metrics:
      parser.error('--table needs --metrics')
    columns = settings(parser, '--table', args.table)
    print(seed_table(columns, args.metrics.split(',')), end='')
    return
  if args.curves:
    if not args.metric or not args.out:
      parser.error('--curves needs --metric and --out')
    drawn = plot_learning_curves(settings(parser, '--curves', args.curves),
                                 args.metric, args.out)
    for name, (steps, means, stds) in drawn.items():
      print(f'{name}: ' + ', '.join(f'{s} {m:.3f}±{d:.3f}'
                                    for s, m, d in zip(steps, means, stds)))
    print(f'Wrote {args.out}')
    return
  print(summarize(args.workdir), end='')
  paths = [] if args.no_plots else plot_curves(args.workdir)
  if paths:
    print('\nCurves: ' + ', '.join(paths))
  elif not args.no_plots:
    print('\nCurves: none (no training lines).')


if __name__ == '__main__':
  cli_errors.run_tool('report', main)
