"""A chain of dots and its gradient in one jitted program, traced: which thread
runs each YNN dot, and how long the largest take."""
import time, jax, jax.numpy as jnp, glob, gzip, json, collections, tempfile
M,K,N=1216,3072,768
x=jnp.ones((M,N)); W1=jnp.ones((N,K))*0.001; W2=jnp.ones((K,N))*0.001
def chain(x, W1, W2, L):
  for _ in range(L):
    x = jax.nn.gelu(x @ W1) @ W2
    x = x / (1 + jnp.abs(x).mean())
  return x
def side(x, W1, W2, L):
  ys = [jnp.sin(x * i) for i in range(L)]
  return chain(x, W1, W2, L), sum(y.sum() for y in ys)
g = jax.jit(jax.grad(lambda x,a,b: side(x,a,b,8)[0].sum() + side(x,a,b,8)[1], argnums=(1,2)))
jax.block_until_ready(g(x,W1,W2))
d = tempfile.mkdtemp(); jax.profiler.start_trace(d)
jax.block_until_ready(g(x,W1,W2))
jax.profiler.stop_trace()
f = glob.glob(f'{d}/**/*.trace.json.gz', recursive=True)[0]
tr = json.load(gzip.open(f))
threads = {(e['pid'], e['tid']): e['args']['name'] for e in tr['traceEvents'] if e.get('ph') == 'M' and e.get('name') == 'thread_name'}
c = collections.Counter(); n = collections.Counter()
for e in tr['traceEvents']:
  if e.get('ph') == 'X' and e['name'].startswith(('ynn', 'dot')):
    c[threads.get((e['pid'], e['tid']), '?')] += e['dur']; n[threads.get((e['pid'], e['tid']), '?')] += 1
print(c, n)
for e in sorted([e for e in tr['traceEvents'] if e.get('ph') == 'X' and e['name'].startswith('ynn')], key=lambda e: -e['dur'])[:5]:
  print(e['name'], e['dur'], threads.get((e['pid'], e['tid'])))
