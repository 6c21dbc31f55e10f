import sys, tempfile, contextlib
import flax.linen as nn
from cmal_jax.benchmarks import run
from cmal_jax.model import layers, umse, unified
@contextlib.contextmanager
def old_dropout():
  saved = [(m, m.Dropout) for m in (layers, umse, unified)]
  for m, _ in saved: m.Dropout = nn.Dropout
  try: yield
  finally:
    for m, d in saved: m.Dropout = d
def main():
  size, batch, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
  contenders = {}
  for name, ctx in (('new', contextlib.nullcontext), ('old', old_dropout)):
    with ctx():
      s = run.JaxStep(run.bench_config(size, batch, itm_warmup_phase=False), tempfile.mkdtemp())
      comp, _ = s.compile()
    contenders[name] = s.stepper(comp)
  t = run.interleaved(contenders, rounds, 0)
  for k, v in t.items(): print(k, {a: round(b, 3) for a, b in v.items()}, flush=True)
  print('old/new', t['old']['median'] / t['new']['median'])
if __name__ == '__main__':
  main()
