"""One matmul of the base step's shapes alone, in each operand layout the step uses
(forward NN, backward NT and TN; the tied vocabulary projection), median of 10."""
import time, jax, jax.numpy as jnp
from jax import lax
def bench(f, *a, n=10):
  f(*a).block_until_ready(); ts=[]
  for _ in range(n):
    t=time.perf_counter(); f(*a).block_until_ready(); ts.append(time.perf_counter()-t)
  return sorted(ts)[n//2]
M,K,N=1216,3072,768
k=jax.random.normal(jax.random.key(0),(4,))
A=jnp.ones((M,K)); B_nn=jnp.ones((K,N)); B_nt=jnp.ones((N,K)); A_t=jnp.ones((K,M))
cases={
 'NN A[M,K]B[K,N]': (jax.jit(lambda a,b: lax.dot_general(a,b,(((1,),(0,)),((),())))), A, B_nn),
 'NT A[M,K]B[N,K]': (jax.jit(lambda a,b: lax.dot_general(a,b,(((1,),(1,)),((),())))), A, B_nt),
 'TN A[K,M]B[K,N]': (jax.jit(lambda a,b: lax.dot_general(a,b,(((0,),(0,)),((),())))), A_t, B_nn),
}
for n,(f,a,b) in cases.items():
  t=bench(f,a,b); print(n, f'{2*M*K*N/t/1e9:.1f} GFLOP/s')
# vocab
for n,(f,a,b) in {'vocab NT [224,768]x[30522,768]': (jax.jit(lambda a,b: lax.dot_general(a,b,(((1,),(1,)),((),())))), jnp.ones((224,768)), jnp.ones((30522,768))),
  'vocab dW [30522,224]x[224,768]': (jax.jit(lambda a,b: a@b), jnp.ones((30522,224)), jnp.ones((224,768)))}.items():
  t=bench(f,a,b); print(n, f'{2*224*768*30522/t/1e9:.1f} GFLOP/s')
