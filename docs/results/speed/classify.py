"""Map profiled op names to what their fused computations contain."""
import json, re, sys, collections
hlo = open(sys.argv[2] if len(sys.argv) > 2 else 'hlo.txt').read()
prof = json.load(open(sys.argv[1]))
# computations: name -> body text
comps = {}
for m in re.finditer(r'^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)^\}', hlo, re.M | re.S):
  comps[m.group(1)] = m.group(2)
# instruction name -> called computation
calls = {}
for m in re.finditer(r'%?([\w.\-]+) = [^\n]*?calls=%?([\w.\-]+)', hlo):
  calls[m.group(1)] = m.group(2)
def ops_of(comp, depth=0):
  body = comps.get(comp, '')
  ops = re.findall(r'= \w+\[[^\]]*\][^ ]* (\w[\w\-]*)\(', body) + re.findall(r'= \([^)]*\) (\w[\w\-]*)\(', body)
  ops = set(ops)
  if depth < 3:
    for c in re.findall(r'calls=%?([\w.\-]+)', body) + re.findall(r'to_apply=%?([\w.\-]+)', body):
      ops |= ops_of(c, depth + 1)
  return ops
def category(name):
  ops = ops_of(calls.get(name, ''))
  for key in ('threefry', 'erf', 'dot', 'convolution', 'scatter', 'gather', 'exponential', 'rsqrt', 'reduce', 'transpose', 'copy', 'select'):
    for o in ops:
      if key in o: return key
  if not ops: return name.split('.')[0]
  return 'other:' + ','.join(sorted(ops))[:40]
cats = collections.Counter(); n = collections.Counter()
skip = ('$', 'Thunk', 'Slinky', 'Pjit', 'Execute')
for name, us in prof.items():
  if name.startswith(skip): continue
  c = category(name); cats[c] += us; n[c] += 1
tot = sum(cats.values())
for c, us in cats.most_common(25): print(f'{c:50s} {us/1e6:7.3f} s  {100*us/tot:5.1f}%  ({n[c]} ops)')
print('total', tot / 1e6)
print('---- top ops')
items = sorted(((us, n) for n, us in prof.items() if not n.startswith(skip)), reverse=True)
for us, n in items[:40]:
  body = comps.get(calls.get(n, ''), '')
  dots = re.findall(r'dot\([^)]*\)[^\n]*', body)
  shapes = re.findall(r'= (\w+\[[\d,]*\])', body)[-1:] 
  print(f'{n:28s} {us/1e3:8.1f} ms  {category(n)[:30]:30s} {shapes} {dots[0][:120] if dots else ""}')
