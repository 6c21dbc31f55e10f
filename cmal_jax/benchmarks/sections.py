"""Named sections of BENCHMARKS.md that other benchmark commands write.

`python -m cmal_jax.benchmarks` rewrites BENCHMARKS.md; a section another
command wrote (between `<!-- begin NAME -->` and `<!-- end NAME -->`) is
kept at the end, so each command refreshes only its own figures.
"""

import os
import re

_SECTION = re.compile(r'<!-- begin (\S+) -->\n.*?<!-- end \1 -->\n', re.S)


def read_sections(path: str) -> list[str]:
  """The sections of the file at path (none if it does not exist)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [m.group(0) for m in _SECTION.finditer(f.read())]


def section(name: str, lines: list[str]) -> str:
  return f'<!-- begin {name} -->\n' + '\n'.join(lines) + f'\n<!-- end {name} -->\n'


def write_section(path: str, name: str, lines: list[str]):
  """Replaces section `name` of the file (or appends it)."""
  text = ''
  if os.path.exists(path):
    with open(path) as f:
      text = f.read()
  new = section(name, lines)
  old = next((m for m in _SECTION.finditer(text) if m.group(1) == name),
             None)
  if old:
    text = text[:old.start()] + new + text[old.end():]
  else:
    text = text.rstrip('\n') + ('\n\n' if text else '') + new
  with open(path, 'w') as f:
    f.write(text)
