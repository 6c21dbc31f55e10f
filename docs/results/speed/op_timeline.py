"""Every op on every thread within 3 ms of one op of a trace:
  python op_timeline.py TRACE.json.gz ynn_fusion.3671"""
import gzip, json, sys
tr = json.load(gzip.open(sys.argv[1])); target = sys.argv[2]
threads = {(e['pid'], e['tid']): e['args']['name'] for e in tr['traceEvents'] if e.get('ph') == 'M' and e.get('name') == 'thread_name'}
ev = [e for e in tr['traceEvents'] if e.get('ph') in ('X',)]
y = [e for e in ev if e['name'] == target][0]
a, b = y['ts'] - 3000, y['ts'] + y['dur'] + 3000
tids = sorted({e['tid'] for e in ev})
for e in sorted(ev, key=lambda e: e['ts']):
  if e['ts'] < b and e['ts'] + e['dur'] > a and not e['name'].startswith(('end:', 'Threadpool')):
    print(f"{(e['ts']-y['ts'])/1e3:8.2f} {e['dur']/1e3:8.2f} {threads.get((e['pid'], e['tid']), '?')[-6:]:8s} {e['name'][:60]}")
