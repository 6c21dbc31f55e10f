"""Op time of a traced step by model part and pass (F forward, B backward),
from the HLO metadata: python op_time_by_part.py TRACE.json.gz (run where
profile_step.py wrote hlo.txt)."""
import re, json, collections, gzip, sys
t = open('hlo.txt').read()
opn = {m.group(1): m.group(2) for m in re.finditer(r'^\s*%([\w.\-]+) = .*?metadata=\{op_name="([^"]*)"', t, re.M)}
tr = json.load(gzip.open(sys.argv[1]))
threads = {(e['pid'], e['tid']): e['args']['name'] for e in tr['traceEvents'] if e.get('ph') == 'M' and e.get('name') == 'thread_name'}
ev = [e for e in tr['traceEvents'] if e.get('ph') == 'X' and 'XLAEigen' in threads.get((e['pid'], e['tid']), '') and not e['name'].startswith(('ThunkExecutor', 'end:', 'Threadpool', 'Slinky'))]
def comp(op):
  bwd = 'transpose(jvp' in op
  op = re.sub(r'^jit\(train_step\)/(cond/branch_\d_fun/)?', '', op)
  op = op.replace('transpose(jvp(CMAL))/', '').replace('jvp(CMAL)/', '')
  parts = op.split('/')
  key = '/'.join(p for p in parts[:4] if not p.startswith('layer_'))
  key = re.sub(r'/(attention|intermediate|output|attention_norm|output_norm).*', '', key)
  return ('B ' if bwd else 'F ') + key[:70]
c = collections.Counter(); first = {}; last = {}
for e in ev:
  k = comp(opn.get(e['name'], e['name']))
  c[k] += e['dur']
tot = sum(c.values())
for k, v in c.most_common(40): print(f'{v/1e6:7.3f} s {100*v/tot:5.1f}%  {k}')
print('total thread-s', tot/1e6)
print('---- by component x kind')
c2 = collections.Counter()
for e in ev:
  op = opn.get(e['name'], e['name'])
  k = comp(op)
  if 'unified' not in k and 'text_encoder/encoder' not in k: continue
  kind = 'dot' if 'dot_general' in op else ('dropout' if 'ropout' in op else ('softmax' if 'softmax' in op or 'reduce_max' in op or '/exp' in op else op.split('/')[-1][:20]))
  c2[(k[:40], kind)] += e['dur']
for k, v in sorted(c2.items(), key=lambda kv: -kv[1])[:40]: print(f'{v/1e6:7.3f}  {k}')
