"""Interleaved step times of the default config under per-program XLA options.
usage: flags.py SIZE BATCH ROUNDS '{"name": {"xla_opt": value}, ...}'"""
import json, sys, tempfile
from cmal_jax.benchmarks import run
def main():
  size, batch, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
  variants = {'default': {}, **json.loads(sys.argv[4])}
  contenders = {}
  for name, opts in variants.items():
    c = run.bench_config(size, batch, itm_warmup_phase=False)
    for k, v in opts.items(): c.compiler_options[k] = v
    s = run.JaxStep(c, tempfile.mkdtemp())
    try:
      comp, secs = s.compile()
    except Exception as e:
      print(name, 'failed', str(e)[:300], flush=True); continue
    print(name, f'compile {secs:.1f}s', flush=True)
    contenders[name] = s.stepper(comp)
  t = run.interleaved(contenders, rounds, 0)
  d = t['default']['median']
  for k, v in t.items(): print(f"{k:12s} median {v['median']:.3f} min {v['min']:.3f} max {v['max']:.3f}  default/this {d / v['median']:.3f}", flush=True)
if __name__ == '__main__':
  main()
