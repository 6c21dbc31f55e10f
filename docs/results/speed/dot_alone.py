import os, sys, time, statistics
import jax, jax.numpy as jnp
shapes = [(4096,4096,4096), (1600,768,3072), (1600,3072,768), (1600,768,768), (600,768,30522)]
for m,k,n in shapes:
  a = jax.random.normal(jax.random.key(0),(m,k)); b = jax.random.normal(jax.random.key(1),(k,n))
  f = jax.jit(jnp.dot); f(a,b).block_until_ready()
  ts=[]
  for _ in range(8):
    t=time.perf_counter(); f(a,b).block_until_ready(); ts.append(time.perf_counter()-t)
  print(f"{m}x{k}x{n}: {2*m*k*n/statistics.median(ts)/1e9:.1f} GFLOP/s")
