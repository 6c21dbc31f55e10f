"""The base step with the encoders run on the whole batch and on two halves
(independent chains), interleaved. Needs the patch encoder_split_layers.diff
(BertEncoder reads SPLITS from the environment), applied to a scratch copy:
  PYTHONPATH=SCRATCH python docs/results/speed/encoder_split.py base 16 4"""
import sys, tempfile, os
def main():
  from cmal_jax.benchmarks import run
  size, batch, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
  contenders = {}
  for n in (1, 2):
    os.environ['SPLITS'] = str(n)
    c = run.bench_config(size, batch, itm_warmup_phase=True)
    s = run.JaxStep(c, tempfile.mkdtemp())
    comp, secs = s.compile()
    print(n, 'compile', round(secs, 1), flush=True)
    contenders[f'split{n}'] = s.stepper(comp)
  t = run.interleaved(contenders, rounds, 1)
  for k, v in t.items(): print(k, f"median {v['median']:.3f} min {v['min']:.3f} max {v['max']:.3f} split1/this {t['split1']['median']/v['median']:.3f}")
if __name__ == '__main__':
  main()
