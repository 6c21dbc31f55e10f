"""Trace a few train steps of one size and aggregate device time by XLA op."""
import glob, gzip, json, os, sys, tempfile, collections
import jax
from cmal_jax.benchmarks import run

def main():
  size, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
  over = dict(a.split('=', 1) for a in sys.argv[4:])
  c = run.bench_config(size, batch, itm_warmup_phase=False)
  for k, v in over.items():
    tgt = c
    for part in k.split('.')[:-1]: tgt = tgt[part]
    old = tgt[k.split('.')[-1]]
    tgt[k.split('.')[-1]] = type(old)(v) if not isinstance(old, bool) else v == 'True'
  s = run.JaxStep(c, tempfile.mkdtemp())
  comp, _ = s.compile()
  open(os.environ.get('HLO', 'hlo.txt'), 'w').write(comp.as_text())
  step = s.stepper(comp)
  step(); step()
  d = tempfile.mkdtemp()
  jax.profiler.start_trace(d, create_perfetto_trace=True)
  total = sum(step() for _ in range(steps))
  jax.profiler.stop_trace()
  f = glob.glob(f'{d}/**/*.trace.json.gz', recursive=True)[0]
  tr = json.load(gzip.open(f))
  ev = [e for e in tr['traceEvents'] if e.get('ph') == 'X']
  threads = {}
  for e in tr['traceEvents']:
    if e.get('ph') == 'M' and e.get('name') == 'thread_name':
      threads[(e['pid'], e['tid'])] = e['args']['name']
  by = collections.Counter(); cnt = collections.Counter()
  by_thread = collections.Counter()
  for e in ev:
    by_thread[threads.get((e['pid'], e['tid']), '?')] += e['dur']
  print('step wall', total / steps)
  for t, v in by_thread.most_common(8): print(f'thread {t}: {v/1e6/steps:.3f} s/step')
  main_thread = max(by_thread, key=by_thread.get)
  for e in ev:
    name = e['name']
    by[name] += e['dur']; cnt[name] += 1
  def kind(n):
    for k in ('dot', 'fusion', 'copy', 'transpose', 'rng', 'threefry', 'reduce', 'convolution', 'gather', 'scatter', 'select', 'erf', 'exp'):
      if k in n.lower(): return k
    return n.split('.')[0]
  kinds = collections.Counter()
  for n, v in by.items(): kinds[kind(n)] += v
  for n, v in kinds.most_common(15): print(f'{n:30s} {v/1e6/steps:8.3f} s/step')
  print('---- top ops')
  for n, v in by.most_common(45): print(f'{n[:70]:70s} {v/1e6/steps:8.3f} s/step x{cnt[n]//steps}')
  json.dump({n: v/steps for n, v in by.items()}, open(os.environ.get('OUT', 'prof.json'), 'w'))

if __name__ == '__main__':
  main()
