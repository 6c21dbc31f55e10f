"""Is a region's colour linearly readable at each stage of a fine-tuned VQA model?

  python docs/results/reads_image/colour_probe.py WORKDIR best

Target: each real region's foreground mean colour, the descriptor block
scenes.extract_region_features puts at dims 7:10 of the world's region
features; inputs: the region features themselves, the UMSE region outputs,
the unified encoder's region-slot outputs (40 batches of 64 questions of
the train split fit a ridge regression, lambda 1 on standardised inputs; R^2
per channel on 40 batches of val)."""
import sys, json
import numpy as np, jax, jax.numpy as jnp
from cmal_jax import finetune
from cmal_jax.data import task_pipeline
from cmal_jax.export import export
from cmal_jax.world import synthetic

def load_vqa_run(workdir, step):
  """(config, task folder, model, params) of a VQA run's checkpoint."""
  config = export.read_run_config(workdir, what='probe')
  directory = synthetic.data_dir(config, workdir)
  vocab = task_pipeline.load_or_build_answer_vocab(directory, config.finetune.num_answers)
  model = finetune.task_model(config, len(vocab))
  params, _ = export.load_params(workdir, export.parse_step(step), what='probe')
  return config, directory, model, params


def ridge_r2(Xtr, ytr, Xva, yva):
  """R^2 per target column on val of a ridge regression (lambda 1,
  standardised inputs) fit on train."""
  mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
  Xtr, Xva = (Xtr - mu) / sd, (Xva - mu) / sd
  A = np.c_[Xtr, np.ones(len(Xtr))]
  w = np.linalg.solve(A.T @ A + 1.0 * np.eye(A.shape[1]), A.T @ ytr)
  pred = np.c_[Xva, np.ones(len(Xva))] @ w
  return 1 - ((pred - yva) ** 2).sum(0) / ((yva - yva.mean(0)) ** 2).sum(0)


def main(workdir, step):
  config, directory, model, params = load_vqa_run(workdir, step)
  T = config.data.max_text_len
  def stages(params, inputs):
    m = model.bind({'params': params})
    t, r = m.embed_text(inputs), m.embed_regions(inputs)
    x = m.fuse(t, r, inputs)
    return r, x[:, inputs['input_ids'].shape[1]:]
  stages = jax.jit(stages)
  out = {}
  for split in ('train', 'val'):
    ds, _ = task_pipeline.make_task_dataset(config, directory, 'vqa', split, batch_size=64, train=False, seed=0)
    feats, umse, uni = [], [], []
    for i, b in enumerate(ds):
      if i == 40: break
      inputs = finetune.model_inputs(b, 'vqa')
      r, u = jax.device_get(stages(params, inputs))
      m = (b['region_mask'] > 0) & b['valid'][:, None]
      feats.append(b['region_feats'][m]); umse.append(r[m]); uni.append(u[m])
    out[split] = [np.concatenate(a) for a in (feats, umse, uni)]
  ytr = out['train'][0][:, 7:10]; yva = out['val'][0][:, 7:10]
  res = {}
  for name, j in (('region_feats', 0), ('umse_region', 1), ('unified_region_slot', 2)):
    r2 = ridge_r2(out['train'][j], ytr, out['val'][j], yva)
    res[name] = [round(float(v), 3) for v in r2]
  print(workdir, step, json.dumps(res))

if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2])
