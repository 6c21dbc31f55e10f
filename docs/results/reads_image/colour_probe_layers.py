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
from cmal_jax.export import export
from cmal_jax.world import synthetic


def main(workdir, step):
  config = export.read_run_config(workdir, what='probe')
  directory = synthetic.data_dir(config, workdir)
  vocab = task_pipeline.load_or_build_answer_vocab(directory, config.finetune.num_answers)
  model = finetune.task_model(config, len(vocab))
  params, _ = export.load_params(workdir, step if step == 'best' else int(step), what='probe')
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
    Xtr, Xva = data['train'][name], data['val'][name]
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
    Xtr, Xva = (Xtr - mu) / sd, (Xva - mu) / sd
    A = np.c_[Xtr, np.ones(len(Xtr))]
    w = np.linalg.solve(A.T @ A + 1.0 * np.eye(A.shape[1]), A.T @ ytr)
    pred = np.c_[Xva, np.ones(len(Xva))] @ w
    r2 = 1 - ((pred - yva) ** 2).sum(0) / ((yva - yva.mean(0)) ** 2).sum(0)
    res[name] = round(float(r2.mean()), 3)
  print(workdir, step, json.dumps(res))


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2])
