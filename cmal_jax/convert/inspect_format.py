"""An inspection report as indented text (what python -m
cmal_jax.convert.inspect prints without --json): a header line per file,
then one line per section, then its errors."""

from cmal_jax.convert.inspect_scan import IMAGES, PAIR, REGIONS
from cmal_jax.convert.inspect_stats import NEAR_FULL_AREA
from cmal_jax.data import records


def _num(x) -> str:
  """A compact number: ints as they are, floats to 4 significant digits."""
  if x is None:
    return '-'
  if isinstance(x, int) or float(x).is_integer() and abs(x) >= 1:
    return str(int(x))
  return f'{x:.4g}'


def _range(s: dict | None, median=True) -> str:
  if not s:
    return '-'
  parts = [f'min {_num(s["min"])}', f'mean {_num(s["mean"])}']
  if median:
    parts.append(f'median {_num(s["median"])}')
  return ' / '.join(parts + [f'max {_num(s["max"])}'])


def _pairs(items) -> str:
  return ', '.join(f'{k} {v}' for k, v in items) or '-'


def _header(r: dict) -> str:
  what = {PAIR: 'pair file', REGIONS: 'region store', IMAGES: 'image store',
          'task': f'{r.get("task")} task file'}.get(r['kind'], r['kind'])
  line = f'{r["path"]}: {what}'
  if 'records' in r:
    line += f', {r["records"]} {"listed" if r["kind"] == IMAGES else "records"}'
    if r['limit'] is not None and r['inspected'] < r['records']:
      line += f' (only the first {r["inspected"]} inspected: --limit)'
  if 'images' in r:
    line += f', {r["images"]} images'
    if r['kind'] == IMAGES:
      line += (f' readable ({r["missing_files"]} missing, '
               f'{r["corrupt_images"]} corrupt)')
  return line


def _feature_line(f: dict | None) -> str:
  if f is None:
    return 'features  none (images only)'
  expected = (f' ({records.META_FILE} {f["expected_width"]})'
              if f['expected_width'] is not None else '')
  widths = '' if len(f['widths']) <= 1 else f' (seen: {f["widths"]})'
  return (f'features  width {_num(f["width"])}{expected}{widths}, '
          f'{"/".join(f["dtypes"]) or "-"}; values mean {_num(f["mean"])} '
          f'std {_num(f["std"])}; {f["zero_regions"]} all-zero regions')


def _pixel_lines(p: dict | None) -> list[str]:
  """The images' line; none when the records carry no image."""
  if p is None:
    return []
  size = lambda s: f'min {s["min"]} / max {s["max"]}'
  return [f'pixels    {p["count"]} images ({_pairs(p["formats"].items())}); '
          f'width {size(p["width"])}, height {size(p["height"])}; bytes '
          f'{_range(p["bytes"], median=False)}']


def _region_lines(r: dict) -> list[str]:
  g, b, t = r['regions'], r['boxes'], r['tags']
  lines = [
      _feature_line(r['features']),
      *_pixel_lines(r.get('pixels')),
      f'regions   {g["total"]} in {r["images"]} images; per image '
      f'{_range(g["per_image"])}; images without regions: '
      f'{g["images_without_regions"]}',
      f'boxes     area {_range(b["area"], median=False)}; {b["zero_area"]} '
      f'zero-area, {b["near_full"]} over {NEAR_FULL_AREA:.0%} of the image',
      f'conf      {_range(r["confidence"], median=False)}',
  ]
  untagged = ('-' if t['untagged_share'] is None
              else f'{t["untagged_share"]:.1%}')
  unknown = (f'; {t["not_in_vocab"]} regions with a tag not in '
             f'{records.META_FILE}' if t['not_in_vocab'] else '')
  lines.append(f'tags      {t["distinct"]} distinct; {untagged} of regions '
               f'untagged; top: {_pairs(t["top"])}{unknown}')
  return lines


def _text_lines(c: dict, label: str) -> list[str]:
  tokens = (f'; tokens {_range(c["tokens"])}' if c['tokens'] else
            f'; tokens unavailable ({c["tokenizer_problem"]})'
            if c['tokenizer_problem'] else '')
  return [f'{label:<9} {c["count"]}; words {_range(c["words"])}{tokens}']


def _anchor_lines(a: dict, what: str, one: str) -> list[str]:
  """what / one: what the pairs are called ('captions' / 'caption')."""
  if not a['available']:
    return [f'anchors   not computed: {a["reason"]}']
  if not a['pairs']:
    return [f'anchors   no {what}']
  hist = ' | '.join(f'{k}: {v}' for k, v in a['histogram'].items())
  lines = [f'anchors   {a["with_anchor_share"]:.1%} of {a["pairs"]} '
           f'{what} have one; {a["per_caption_mean"]:.2f} per {one}; '
           f'{hist}',
           f'          top word -> tag: {_pairs(a["top_anchors"])}',
           '          top unmatched tags (in the image, named by no word): '
           f'{_pairs(a["top_unmatched_tags"])}']
  if a['top_named_undetected']:
    lines.append('          named but no free region: '
                 f'{_pairs(a["top_named_undetected"])}')
  if a['images_unreadable']:
    lines.append(f'          {a["images_unreadable"]} images unreadable in '
                 'the store')
  return lines


def _error_lines(r: dict, max_errors: int) -> list[str]:
  if not r['num_errors']:
    return ['errors    none']
  by_field = ', '.join(f'{k} {v}' for k, v in
                       sorted(r.get('errors_by_field', {}).items()))
  lines = [f'errors    {r["num_errors"]}' +
           (f' (by field: {by_field})' if by_field else '')]
  shown = r['errors'][:max_errors]
  lines += [f'  {e}' for e in shown]
  if r['num_errors'] > len(shown):
    lines.append(f'  ... and {r["num_errors"] - len(shown)} more '
                 f'(--max_errors={max_errors})')
  return lines


def _body_lines(report: dict) -> list[str]:
  """What a file's valid records hold, section by section."""
  lines = []
  if report['kind'] in (PAIR, REGIONS, IMAGES):
    lines += _region_lines(report)
  is_task = report['kind'] == 'task'
  if 'captions' in report:
    lines += _text_lines(report['captions'],
                         'texts' if is_task else 'captions')
  if 'anchors' in report:
    lines += _anchor_lines(report['anchors'],
                           *(('text-image pairs', 'pair') if is_task
                             else ('captions', 'caption')))
  return lines


def format_report(report: dict, max_errors: int = 20) -> str:
  """The report as indented text (what main prints without --json)."""
  if report['kind'] == 'folder':
    parts = [format_report(f, max_errors) for f in report['files']]
    if report.get('errors'):
      parts.append('\n'.join(report['errors']))
    parts.append(f'{report["path"]}: files: {len(report["files"])}, '
                 f'errors: {report["num_errors"]}')
    return '\n\n'.join(parts)
  lines = []
  if report.get('valid_records') == 0:
    lines.append('no valid records to describe')
  elif 'valid_records' in report:  # Not for an unreadable file.
    lines += _body_lines(report)
  lines += _error_lines(report, max_errors)
  return '\n'.join([_header(report)] + ['  ' + l for l in lines])

