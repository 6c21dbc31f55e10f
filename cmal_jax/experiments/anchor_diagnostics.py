"""What a pre-trained CMAL model's anchor points look like, for reading the
data-efficiency results.

  python -m cmal_jax.experiments.anchor_diagnostics --workdir=runs/pretrain

Reports, as JSON (printed, and written to --out if given):
  coverage: of the pairs whose caption fits its image, how many have an
    anchor, anchors per pair, how often max_anchors cut the list short, and
    the share of text tokens and of regions that are anchors. AMC learns
    only where there are anchors.
  amc: the model's AMC accuracies on these pairs, every anchor swapped.
  swap_probe: whether a swapped feature is recognisable as foreign in the
    unified encoder's input (after the slot embeddings). A ridge-regression
    linear probe is fitted on half the pairs to tell a region feature moved
    into a text slot from the native words (and a word moved into a region
    slot from the native regions) and scored on the other half (balanced
    accuracy: 0.5 is chance). Near 1.0 means the foreign slots stand out
    before any attention, so finding them teaches nothing; AMC must then
    come from pairing them by content.
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from cmal_jax import checkpoint, cli_errors, evaluate, objectives
from cmal_jax.data import pipeline
from cmal_jax.world import synthetic
from cmal_jax.data.tokenizer import load_tokenizer
from cmal_jax.export import export
from cmal_jax.model import cmap
from cmal_jax.model.cmal import CMAL, ModelConfig
from cmal_jax.model.unified import SlotEmbeddings


def collect(workdir, split, max_pairs, step=None):
  """Runs the model over up to max_pairs pairs of `split` with every anchor
  swapped; returns numpy arrays of what the report needs."""
  config = export.read_run_config(workdir)
  if config.task != 'pretrain':
    raise ValueError(f'anchor_diagnostics: {workdir} is a {config.task!r} '
                     'run; it needs a pre-training workdir.')
  config.cmap.enabled = True  # Swap even in a CMCL model, to compare.
  directory = synthetic.data_dir(config, workdir)
  params, where = checkpoint.load_pretrained_params(workdir, step,
                                                    what='--workdir')
  tokenizer = load_tokenizer(config.data.vocab_path or None)
  specials = objectives.SpecialTokens.from_tokenizer(tokenizer)
  ds, vocab, _ = pipeline.make_dataset(
      config, directory, split or config.data.train_split,
      batch_size=config.eval.batch_size, train=False, seed=config.seed)
  model = CMAL(ModelConfig.from_config(config.model,
                                       config.model.num_tags or vocab.num_tags))
  rng = jax.random.key(config.seed + evaluate.EVAL_SEED_OFFSET)

  @jax.jit
  def run(params, batch):
    inputs, t = objectives.prepare_inputs(batch, rng, config, specials,
                                          actions='all_swapped', corrupt=False)
    out, state = model.apply(
        {'params': params}, inputs, capture_intermediates=(
            lambda module, _: isinstance(module, SlotEmbeddings)),
        mutable=['intermediates'])
    hybrid = state['intermediates']['slots']['__call__'][0]  # [B, T + R, D]
    hits = {k: jnp.argmax(out[f'amc_{k}_logits'], -1) == t[f'amc_{v}']
            for k, v in (('t2r', 'region'), ('r2t', 'text_pos'),
                         ('word', 'word'))}
    return dict(hybrid=hybrid, action=inputs['anchor_action'],
                text_cover=objectives.anchor_text_cover(batch),
                region_cover=objectives.anchor_region_cover(batch), **{
                    f'hit_{k}': v for k, v in hits.items()})

  parts, seen = [], 0
  for batch in ds:
    batch.pop('stats')
    keep = np.asarray(batch['itm_label']) > 0  # Captions of their image.
    out = jax.device_get(run(params, batch))
    fields = ('text_mask', 'region_mask', 'anchor_valid', 'anchor_text_pos',
              'anchor_region')
    part = {**{k: np.asarray(batch[k]) for k in fields}, **out}
    parts.append({k: v[keep] for k, v in part.items()})
    seen += int(keep.sum())
    if seen >= max_pairs:
      break
  if not parts:
    raise ValueError(f'anchor_diagnostics: no pairs in split {split!r} of '
                     f'{directory}.')
  arrays = {k: np.concatenate([p[k] for p in parts])[:max_pairs]
            for k in parts[0]}
  return arrays, dict(workdir=workdir, checkpoint=where,
                      data=directory, max_anchors=config.data.max_anchors)


def coverage(a, max_anchors):
  """Anchor statistics of the pairs in `a`."""
  n = a['anchor_valid'].sum(1)
  return dict(
      pairs=int(len(n)),
      with_anchor=float(np.mean(n > 0)),
      anchors_per_pair=float(np.mean(n)),
      at_max_anchors=float(np.mean(n >= max_anchors)),
      anchor_token_share=float(a['text_cover'].sum()
                               / max(a['text_mask'].sum(), 1)),
      anchor_region_share=float(a['region_cover'].sum()
                                / max(a['region_mask'].sum(), 1)))


def amc_accuracy(a):
  w = a['action'] == cmap.SWAP
  return {k: float(a[f'hit_{k}'][w].mean()) if w.any() else float('nan')
          for k in ('t2r', 'r2t', 'word')}


def ridge_probe(x, y, fit, lam=1e-2):
  """Balanced accuracy on ~fit of a ridge-regression classifier fitted on
  `fit`: x [N, D], y [N] bool. The class weights sum to 1, so lam is
  relative to a Gram matrix of standardised features (diagonal ~1)."""
  mean, std = x[fit].mean(0), x[fit].std(0) + 1e-6
  z = np.concatenate([(x - mean) / std, np.ones((len(x), 1))], 1)
  target = np.where(y, 1.0, -1.0)
  # Each class weighs half, however rare the foreign slots are.
  w = np.where(y, 0.5 / max(y[fit].sum(), 1), 0.5 / max((~y[fit]).sum(), 1))
  zf = z[fit] * w[fit, None]
  coef = np.linalg.solve(zf.T @ z[fit] + lam * np.eye(z.shape[1]),
                         zf.T @ target[fit])
  pred = z[~fit] @ coef > 0
  test = y[~fit]
  return float((np.mean(pred[test]) + np.mean(~pred[~test])) / 2)


def swap_probe(a):
  """Balanced held-out accuracies of linear probes telling swapped-in
  features from native ones, on each side of the hybrid sequence."""
  B, T = a['text_mask'].shape
  rows = np.arange(B)[:, None]
  swapped = a['action'] == cmap.SWAP  # [B, K]
  moved_text = np.zeros_like(a['text_mask'], bool)
  moved_text[rows, a['anchor_text_pos']] |= swapped
  moved_region = np.zeros_like(a['region_mask'], bool)
  moved_region[rows, a['anchor_region']] |= swapped
  fit_rows = np.arange(B) < B // 2
  result = {}
  for side, moved, native, sl in (
      ('text', moved_text, (a['text_mask'] > 0) & ~a['text_cover'],
       slice(0, T)),
      ('region', moved_region, (a['region_mask'] > 0) & ~a['region_cover'],
       slice(T, None))):
    use = moved | native  # Other anchor pieces hold the mask vector: out.
    x = a['hybrid'][:, sl][use].astype(np.float32)
    y = moved[use]
    fit = np.broadcast_to(fit_rows[:, None], use.shape)[use]
    if y[fit].all() or not y[fit].any() or y[~fit].all() or not y[~fit].any():
      result[side] = float('nan')  # One class only: nothing to probe.
      continue
    result[side] = ridge_probe(x, y, fit)
  return result


def diagnose(workdir, split='', max_pairs=1024, step=None):
  a, info = collect(workdir, split, max_pairs, step)
  return dict(info, coverage=coverage(a, info['max_anchors']),
              amc_all_swapped=amc_accuracy(a), swap_probe=swap_probe(a))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--workdir', required=True, help='A pre-training workdir.')
  ap.add_argument('--step', type=int, default=None,
                  help='Checkpoint step (default: the latest).')
  ap.add_argument('--split', default='', help='Default: the training split.')
  ap.add_argument('--max_pairs', type=int, default=1024)
  ap.add_argument('--out', default='', help='Also write the JSON here.')
  cli_errors.add_verbose_flag(ap)
  args = ap.parse_args(argv)
  report = diagnose(args.workdir, args.split, args.max_pairs, args.step)
  text = json.dumps(report, indent=1)
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text + '\n')
  return report


if __name__ == '__main__':
  cli_errors.run_tool('anchor_diagnostics', main)
