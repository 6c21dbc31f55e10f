"""Does a fine-tuned model read the image? Measured over its checkpoints.

  python -m cmal_jax.experiments.image_reliance --workdir=runs/ft/vqa \\
      [--steps=all|best|100,200] [--split=val] [--grad_batches=4] [--out=F]

For each checkpoint of a fine-tuning workdir (issue 26's "measure before you
change"), on its eval split:
  metric           the task metric, and the same with each example scored on
                   another example's image (controls.images_shuffled; vqa,
                   ve, nlvr2). A model that reads the image falls towards the
                   blind baseline under the control; one that answers from
                   the text keeps its score. VQA also per question type.
  attention        per unified layer, the attention mass (averaged over
                   heads and examples) that [CLS] and the real text tokens
                   put on the real region slots, beside the share a uniform
                   reader would put there (regions / real slots).
  gradients        on the first --grad_batches batches of the train split
                   (no dropout), the gradient norm of the task loss per
                   top-level parameter group (text_encoder, vision_encoder,
                   pixels, slots, unified, the head), divided by that group's
                   parameter norm (how fast, relatively, each part moves),
                   and the gradient norm at the region features themselves
                   per example.

Writes --out (default WORKDIR/image_reliance.json): {step: {...}} with the
blind baseline of the split, and prints one line per checkpoint.
"""

import argparse
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cmal_jax import cli_errors, controls, finetune, sharding
from cmal_jax.data import task_pipeline
from cmal_jax.export import export
from cmal_jax.logs import log
from cmal_jax.model.pixels import reads_pixels
from cmal_jax.world import synthetic, task_baselines

PROG = 'image_reliance'


def checkpoint_steps(workdir, steps):
  """--steps -> the checkpoints to measure: 'all' (every saved step, in
  order), 'best', or comma-separated step numbers."""
  if steps == 'best':
    return ['best']
  if steps == 'all':
    folder = os.path.join(workdir, 'checkpoints')
    found = sorted(int(d) for d in os.listdir(folder) if d.isdigit())
    if not found:
      raise FileNotFoundError(f'{PROG}: {folder} holds no checkpoint')
    return found
  return [int(s) for s in steps.split(',')]


def attention_to_regions(intermediates, inputs, num_layers):
  """Per unified layer, the attention mass on the real region slots from
  [CLS] and from the real text tokens after it (mean over heads and
  examples), and a uniform reader's share. -> {name: [num_layers]}."""
  T = inputs['input_ids'].shape[1]
  text = inputs['text_mask'] > 0
  regions = inputs['region_mask'] > 0
  from_text = text.at[:, 0].set(False)  # The tokens after [CLS].
  uniform = regions.sum(1) / (regions.sum(1) + text.sum(1))  # [B]
  cls, tokens = [], []
  for i in range(num_layers):
    probs = intermediates['unified'][f'layer_{i}']['attention'][
        'attention_probs'][0].astype(jnp.float32)  # [B, H, L, L]
    on_regions = jnp.sum(jnp.where(regions[:, None, None], probs[..., T:], 0),
                         -1).mean(1)  # [B, L]
    cls.append(on_regions[:, 0])
    per_token = jnp.sum(jnp.where(from_text, on_regions[:, :T], 0), 1)
    tokens.append(per_token / jnp.maximum(from_text.sum(1), 1))
  return {'cls_on_regions': jnp.stack(cls, 1),        # [B, layers]
          'text_on_regions': jnp.stack(tokens, 1),
          'uniform_share': uniform}


def group_norms(tree):
  """{top-level parameter group: L2 norm} of a parameter-shaped tree."""
  return {k: float(optax.global_norm(v)) for k, v in tree.items()}


def measure_step(model, params, config, directory, mesh, split, jitted,
                 grad_batches):
  """The measurements of one checkpoint (module docstring); jitted:
  make_functions' functions."""
  predict, predict_shuffled, attend, gradients = jitted
  results = finetune.evaluate_split(model, params, config, directory, split,
                                    mesh, predict)
  out = finetune.metric_fields(results, config.eval.best_metric)
  if config.task in finetune.IMAGES_SHUFFLED_TASKS:
    out.update(finetune.shuffled_metrics(model, params, config, directory,
                                         split, mesh, predict_shuffled))

  # Attention, over the split's first batches (up to 512 examples).
  ds, _ = task_pipeline.make_task_dataset(
      config, directory, config.task, split,
      batch_size=config.eval.batch_size, train=False, seed=config.seed)
  sums, seen = {}, 0
  for batch in ds:
    inputs = finetune.model_inputs(batch, config.task)
    got = jax.device_get(attend(params, inputs))
    valid = np.repeat(batch['valid'], len(inputs['input_ids']) //
                      len(batch['valid']))
    for k, v in got.items():
      sums[k] = sums.get(k, 0) + np.asarray(v)[valid].sum(0)
    seen += int(valid.sum())
    if seen >= 512:
      break
  out.update({k: (v / seen).round(4).tolist() for k, v in sums.items()})

  # Gradients, over the train split's first batches.
  ds, _ = task_pipeline.make_task_dataset(
      config, directory, config.task, config.data.train_split,
      batch_size=config.batch_size, train=False, seed=config.seed)
  grads, feature_grads = None, []
  for i, batch in enumerate(ds):
    if i == grad_batches:
      break
    batch = {k: v for k, v in batch.items() if k != 'stats'}
    g, g_feats = gradients(params, batch)
    g = jax.device_get(g)
    grads = g if grads is None else jax.tree.map(np.add, grads, g)
    feature_grads.append(float(g_feats))
  grads = jax.tree.map(lambda x: x / grad_batches, grads)
  norms, param_norms = group_norms(grads), group_norms(params)
  out['grad_norm'] = {k: round(v, 6) for k, v in norms.items()}
  out['grad_norm_relative'] = {k: round(norms[k] / max(param_norms[k], 1e-12),
                                        8) for k in norms}
  if not reads_pixels(config):  # A pixel model has no region features.
    out['grad_norm_region_feats'] = round(float(np.mean(feature_grads)), 8)
  return out


def make_functions(model, config):
  """Jitted (predict, predict under images_shuffled, attend(params, inputs),
  gradients(params, batch))."""
  num_layers = config.model.unified_layers
  predict = jax.jit(finetune.make_predict_step(model, config))
  predict_shuffled = jax.jit(finetune.make_predict_step(
      model, config, controls.images_shuffled))

  @jax.jit
  def attend(params, inputs):
    _, state = model.apply({'params': params}, inputs,
                           mutable=['intermediates'])
    return attention_to_regions(state['intermediates'], inputs, num_layers)

  @jax.jit
  def gradients(params, batch):
    """Parameter gradients of the task loss, and the per-example gradient
    norm at the region features (NaN for a model that reads pixels)."""
    def loss(params, feats):
      b = dict(batch, region_feats=feats) if feats is not None else batch
      outputs = model.apply({'params': params},
                            finetune.model_inputs(b, config.task))
      return finetune.task_loss(outputs, b, config)[0]
    feats = batch.get('region_feats')
    if feats is None:
      return jax.grad(loss)(params, None), jnp.float32(jnp.nan)
    g, g_feats = jax.grad(loss, argnums=(0, 1))(params, feats)
    rows = g_feats.reshape(g_feats.shape[0], -1)
    # The loss is a mean over the batch: per example, times B.
    return g, jnp.mean(jnp.linalg.norm(rows, axis=-1)) * rows.shape[0]

  return predict, predict_shuffled, attend, gradients


def measure(workdir, steps='all', split=None, grad_batches=4):
  """{step: measurements} of a fine-tuning workdir's checkpoints, with
  'blind_baseline' of the split."""
  config = export.read_run_config(workdir, what=PROG)
  if config.recipe != 'finetune' or config.task == 'retrieval':
    raise ValueError(f'{PROG}: {workdir} is not a vqa, ve, nlvr2 or rec '
                     f'fine-tuning run (task {config.get("task")!r})')
  directory = synthetic.data_dir(config, workdir)
  split = split or config.data.eval_split
  mesh = sharding.mesh_from_config(config)
  vocab = (task_pipeline.load_or_build_answer_vocab(
      directory, config.finetune.num_answers) if config.task == 'vqa' else ())
  model = finetune.task_model(config, len(vocab))
  rules = sharding.rules(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    jitted = make_functions(model, config)
    report = {'task': config.task, 'split': split,
              'blind_baseline': task_baselines.blind_baseline_of(
                  directory, config.task, (split,), config.data.on_error,
                  reads_pixels(config))[split], 'steps': {}}
    for step in checkpoint_steps(workdir, steps):
      params, where = export.load_params(workdir, step, what=PROG)
      got = measure_step(model, jax.device_put(params), config, directory,
                         mesh, split, jitted, grad_batches)
      report['steps'][str(step)] = got
      log(f'{where}: ' + summary(got, config.eval.best_metric))
  return report


def summary(got, metric):
  """One line: the metric and its control, the last layer's attention on
  the regions, and the vision side's relative gradient."""
  parts = [f'{metric}={got[metric]:.3f}']
  if metric + finetune.SHUFFLED in got:
    parts.append(f'shuffled={got[metric + finetune.SHUFFLED]:.3f}')
  parts.append(f'cls_on_regions={got["cls_on_regions"][-1]:.3f} '
               f'text_on_regions={got["text_on_regions"][-1]:.3f} '
               f'(uniform {got["uniform_share"]:.3f})')
  rel = got['grad_norm_relative']
  parts.append(' '.join(f'rel_grad/{k}={v:.2e}' for k, v in sorted(
      rel.items())))
  return ' '.join(parts)


def main(argv=None):
  ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n')[0])
  ap.add_argument('--workdir', required=True)
  ap.add_argument('--steps', default='all')
  ap.add_argument('--split', default='')
  ap.add_argument('--grad_batches', type=int, default=4)
  ap.add_argument('--out', default='')
  cli_errors.add_verbose_flag(ap)
  args = ap.parse_args(argv)
  report = measure(args.workdir, args.steps, args.split or None,
                   args.grad_batches)
  out = args.out or os.path.join(args.workdir, 'image_reliance.json')
  with open(out, 'w') as f:
    json.dump(report, f, indent=1)
  log(f'wrote {out}')
  return report


if __name__ == '__main__':
  cli_errors.run_tool(PROG, main)
