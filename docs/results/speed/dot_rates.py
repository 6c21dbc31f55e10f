"""Per dot of a profiled step: GFLOP (from the HLO) over its op time. Run in the
folder where profile_step.py wrote hlo.txt and prof.json."""
import re, json, collections, math
t = open('hlo.txt').read()
prof = json.load(open('prof.json'))
# computations
comps = {}
for m in re.finditer(r'^%?([\w.\-]+) \((.*?)\) -> .*? \{\n(.*?)\n\}', t, re.M | re.S):
  comps[m.group(1)] = m.group(3)
inst = {}
for m in re.finditer(r'%([\w.\-]+) = (\S+?)(?:\{[^}]*\})? fusion\((.*?)\), kind=(\w+), calls=%([\w.\-]+), metadata=\{op_name="([^"]*)"', t):
  inst[m.group(1)] = (m.group(2), m.group(5), m.group(6))
def shape(s):
  m = re.match(r'\w+\[([\d,]*)\]', s); return [int(x) for x in m.group(1).split(',') if x] if m else []
def dot_flops(body):
  fl = 0; desc = []
  for m in re.finditer(r'= (\w+\[[\d,]*\])\S* dot\(([^)]*)\), (lhs_batch_dims=\{[\d,]*\}, )?lhs_contracting_dims=\{([\d,]*)\}', body):
    out = shape(m.group(1))
    # lhs operand shape
    ops = m.group(2).split(', ')
    lhs = re.search(r'(\w+\[[\d,]*\])', ops[0])
    lshape = shape(lhs.group(1)) if lhs else None
    if lshape is None:
      # find lhs definition in body
      name = ops[0].strip().lstrip('%')
      d = re.search(r'%' + re.escape(name) + r' = (\w+\[[\d,]*\])', body)
      lshape = shape(d.group(1)) if d else []
    k = math.prod(lshape[int(c)] for c in m.group(4).split(',') if c) if lshape else 0
    fl += 2 * math.prod(out) * k; desc.append((tuple(out), k))
  return fl, desc
cat = collections.Counter(); flops = collections.Counter(); rows = []
for name, dur in prof.items():
  base = name
  if base not in inst: 
    cat['other:' + name.split('.')[0]] += dur; continue
  shp, comp, op = inst[base]
  body = comps.get(comp, '')
  fl, desc = dot_flops(body)
  kind = ('dot' if fl else 'nodot') + (':ynn' if base.startswith('ynn') else '')
  cat[kind] += dur; flops[kind] += fl
  if fl: rows.append((dur, fl, base, desc, op[-90:]))
for k, v in cat.most_common(20): print(f'{k:40s} {v/1e6:7.3f} s  {flops[k]/1e9:8.1f} GFLOP')
rows.sort(reverse=True)
tot = sum(r[0] for r in rows)
print('dots total', tot/1e6, 'GFLOP', sum(r[1] for r in rows)/1e9)
# efficiency buckets
b = collections.defaultdict(lambda: [0, 0, 0])
for dur, fl, n, desc, op in rows:
  key = 'attn' if ('bqhd' in op or 'bhqk' in op or re.search(r'attention/dot_general', op)) else op.split('/')[-1]
  gf = fl / dur / 1e3
  bucket = 'slow<80' if gf < 80 else ('mid<140' if gf < 140 else 'fast')
  b[bucket][0] += dur; b[bucket][1] += fl; b[bucket][2] += 1
for k, (d, f, n) in b.items(): print(k, f'{d/1e6:.3f}s {f/1e9:.1f} GFLOP n={n} -> {f/d/1e3:.1f} GFLOP/s')
print('--- slowest per flop (top time among <80 GFLOP/s)')
for dur, fl, n, desc, op in [r for r in rows if r[1]/r[0]/1e3 < 80][:25]:
  print(f'{dur/1e3:7.1f} ms {fl/dur/1e3:6.1f} GF/s {desc} {op}')
