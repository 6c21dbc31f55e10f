"""How many of the XLA:CPU Eigen threads run an op, over a jax.profiler trace
(default: the newest under /tmp). Every op event on those threads counts
(not the runtime's own ThunkExecutor / threadpool markers)."""
import collections, glob, gzip, json, os, sys
f = sys.argv[1] if len(sys.argv) > 1 else sorted(
    glob.glob('/tmp/**/*.trace.json.gz', recursive=True), key=os.path.getmtime)[-1]
tr = json.load(gzip.open(f))
threads = {(e['pid'], e['tid']): e['args']['name'] for e in tr['traceEvents'] if e.get('ph') == 'M' and e.get('name') == 'thread_name'}
ev = [e for e in tr['traceEvents'] if e.get('ph') == 'X']
skip = ('Threadpool', 'end:', 'ThunkExecutor', 'Slinky')
ops = [e for e in ev if 'XLAEigen' in threads.get((e['pid'], e['tid']), '') and not e['name'].startswith(skip)]
by = collections.defaultdict(list)
for e in ops: by[threads[(e['pid'], e['tid'])]].append((e['ts'], e['ts'] + e['dur']))
pts = []
for t, v in by.items():
  v.sort(); busy = 0; end = 0
  for a, b in v:
    if b > end: busy += b - max(a, end); end = max(end, b)
  print(t, 'busy s', round(busy / 1e6, 3))
  # merge intervals per thread
  m = []
  for a, b in v:
    if m and a <= m[-1][1]: m[-1][1] = max(m[-1][1], b)
    else: m.append([a, b])
  for a, b in m: pts += [(a, 1), (b, -1)]
pts.sort(); cur = 0; last = pts[0][0]; hist = collections.Counter()
for x, d in pts:
  hist[cur] += x - last; cur += d; last = x
print('seconds with k threads busy', {k: round(v / 1e6, 2) for k, v in sorted(hist.items())})
ynn = [e for e in ops if e['name'].startswith('ynn')]
print('ynn events', len(ynn), 'distinct ops', len({e['name'] for e in ynn}))
