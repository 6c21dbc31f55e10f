import glob, gzip, json, sys, collections
f = sorted(glob.glob('/tmp/**/*.trace.json.gz', recursive=True), key=lambda p: __import__('os').path.getmtime(p))[-1]
tr = json.load(gzip.open(f))
threads = {(e['pid'], e['tid']): e['args']['name'] for e in tr['traceEvents'] if e.get('ph') == 'M' and e.get('name') == 'thread_name'}
ev = [e for e in tr['traceEvents'] if e.get('ph') == 'X']
ops = [e for e in ev if e['name'].startswith(('ynn_fusion', 'fusion', 'copy', 'loop', 'input', 'wrapped', 'transpose', 'reduce', 'select', 'convert', 'bitcast'))]
bythread = collections.defaultdict(list)
for e in ops: bythread[threads.get((e['pid'], e['tid']), '?')].append((e['ts'], e['ts'] + e['dur'], e['name']))
t0 = min(a for v in bythread.values() for a, _, _ in v); t1 = max(b for v in bythread.values() for _, b, _ in v)
print('span s', (t1 - t0) / 1e6)
for t, v in bythread.items():
  v.sort(); busy = 0; end = 0
  for a, b, _ in v:
    if b > end: busy += b - max(a, end); end = b
  ynn = sum(b - a for a, b, n in v if n.startswith('ynn'))
  print(f'{t}: ops {len(v)} busy {busy/1e6:.2f}s  ynn {ynn/1e6:.2f}s')
# concurrency: fraction of span with 2 threads busy
pts = []
for t, v in bythread.items():
  for a, b, _ in v: pts += [(a, 1), (b, -1)]
pts.sort(); cur = 0; last = t0; hist = collections.Counter()
for x, d in pts:
  hist[min(cur, 3)] += x - last; cur += d; last = x
print({k: round(v / 1e6, 2) for k, v in sorted(hist.items())})
