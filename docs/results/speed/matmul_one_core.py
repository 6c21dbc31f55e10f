"""A 2048^3 float32 jit dot: run as is and under taskset -c 0 (one core)."""
import time, jax, jax.numpy as jnp
n=2048
a=jnp.ones((n,n),jnp.float32); b=jnp.ones((n,n),jnp.float32)
f=jax.jit(lambda a,b:a@b)
f(a,b).block_until_ready()
t=time.perf_counter(); 
for _ in range(10): f(a,b).block_until_ready()
dt=(time.perf_counter()-t)/10
print('GFLOP/s', 2*n**3/dt/1e9)
