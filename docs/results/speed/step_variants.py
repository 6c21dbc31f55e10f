"""Interleaved step times of pre-training config variants at one size."""
import sys, tempfile, os
from cmal_jax.benchmarks import run
def main():
  size = sys.argv[1]; batch = int(sys.argv[2]); steps = int(sys.argv[3])
  variants = {
    'default': {},
    'corrupted': {'loss.itm_inputs': 'corrupted', 'loss.itm_corrupted_warmup': 0.0},
    'blind_nowarm': {'loss.itm_corrupted_warmup': 0.0},
  }
  for arg in sys.argv[4:]:
    name, kv = arg.split('=', 1)
    variants[name] = dict(p.split(':', 1) for p in kv.split(',')) if kv else {}
  def parse(v):
    for f in (int, float):
      try: return f(v)
      except ValueError: pass
    return {'True': True, 'False': False}.get(v, v)
  if os.environ.get('VARIANTS'):
    keep = os.environ['VARIANTS'].split(',')
    variants = {k: v for k, v in variants.items() if k in keep}
  root = tempfile.mkdtemp()
  contenders = {}
  for name, over in variants.items():
    c = run.bench_config(size, batch, itm_warmup_phase=False)
    for k, v in over.items():
      sec, key = k.rsplit('.', 1) if '.' in k else (None, k)
      tgt = c
      for part in k.split('.')[:-1]: tgt = tgt[part]
      tgt[k.split('.')[-1]] = parse(v) if isinstance(v, str) else v
    s = run.JaxStep(c, os.path.join(root, size))
    comp, secs = s.compile()
    fl, by = run.cost(comp)
    print(f'{name}: compile {secs:.1f}s flops {fl/1e9:.1f} GFLOP', flush=True)
    contenders[name] = s.stepper(comp)
    if name == 'corrupted' and os.environ.get('TORCH'):
      inputs, targets = s.corrupted_inputs()
      w = run.TorchWorker(s, inputs, targets, 'eager'); w.step()
      contenders['torch_eager'] = w.step
  t = run.interleaved(contenders, steps, 1, rewarm=0)  # As run then.
  base = t[next(iter(t))]['median']
  for name, v in t.items():
    print(f"{name}: median {v['median']*1e3:.1f} ms (min {v['min']*1e3:.1f}, max {v['max']*1e3:.1f}) ratio to default {v['median']/base:.3f}")

if __name__ == '__main__':
  main()
