"""Where does a region's colour leave the unified encoder? A linear probe per stage.

  python docs/results/reads_image/colour_probe_layers.py WORKDIR best

As colour_probe.py (target: each real region's foreground mean colour,
dims 7:10 of the world's region features; ridge regression, lambda 1 on
standardised inputs, fit on 40 batches of 64 train questions, R^2 on 40 of
val), read at every stage a region slot passes: the UMSE output, the same
scaled and summed with its slot embeddings (location + type) after the slot
LayerNorm, and the output of each unified layer. Prints R^2 per stage (mean
of R, G, B)."""
import sys, json
import numpy as np, jax
from cmal_jax import finetune
from cmal_jax.data import task_pipeline
from colour_probe import load_vqa_run, ridge_r2  # This script's folder.


def main(workdir, step):
  config, directory, model, params = load_vqa_run(workdir, step)
  L = config.model.unified_layers

  def stages(params, inputs):
    _, state = model.apply({'params': params}, inputs, capture_intermediates=True,
                           mutable=['intermediates'])
    inter = state['intermediates']
    T = inputs['input_ids'].shape[1]
    out = {'umse_region': inter['vision_encoder']['__call__'][0]}
    out['slots'] = inter['slots']['__call__'][0][:, T:]
    for i in range(L):
      out[f'unified_layer_{i}'] = inter['unified'][f'layer_{i}']['__call__'][0][:, T:]
    return out
  stages = jax.jit(stages)
  data = {}
  for split in ('train', 'val'):
    ds, _ = task_pipeline.make_task_dataset(config, directory, 'vqa', split, batch_size=64, train=False, seed=0)
    acc = {}
    for i, b in enumerate(ds):
      if i == 40: break
      inputs = finetune.model_inputs(b, 'vqa')
      got = jax.device_get(stages(params, inputs))
      m = (b['region_mask'] > 0) & b['valid'][:, None]
      acc.setdefault('target', []).append(b['region_feats'][m][:, 7:10])
      for k, v in got.items():
        acc.setdefault(k, []).append(np.asarray(v, np.float32)[m])
    data[split] = {k: np.concatenate(v) for k, v in acc.items()}
  ytr, yva = data['train'].pop('target'), data['val'].pop('target')
  res = {}
  for name in data['train']:
    r2 = ridge_r2(data['train'][name], ytr, data['val'][name], yva)
    res[name] = round(float(r2.mean()), 3)
  print(workdir, step, json.dumps(res))


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2])
