import os, sys, tempfile, time
from cmal_jax.benchmarks import run
def main():
  size, batch, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
  s = run.JaxStep(run.bench_config(size, batch, itm_warmup_phase=False), tempfile.mkdtemp())
  comp, _ = s.compile()
  jstep = s.stepper(comp)
  print('jax alone', [round(jstep(), 2) for _ in range(2)], flush=True)
  inputs, targets = s.corrupted_inputs()
  w = run.TorchWorker(s, inputs, targets, 'eager'); w.step()
  for rewarm in (0, 1):
    t = run.interleaved({'jax': jstep, 'torch': w.step}, rounds, 0, rewarm=rewarm)
    print('rewarm', rewarm, {k: (round(v['median'], 2), round(v['min'], 2), round(v['max'], 2)) for k, v in t.items()}, flush=True)
  w.close()
if __name__ == '__main__':
  main()
