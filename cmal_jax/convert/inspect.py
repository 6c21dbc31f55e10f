r"""What a region store, pair file or task file holds, and what is wrong in it.

  python -m cmal_jax.convert.inspect /tmp/world/train.array_record --top=3

  /tmp/world/train.array_record: pair file, 200 records, 200 images
    features  width 256 (meta.json 256), float32; values mean 0.3593 std
              0.8992; 0 all-zero regions
    regions   858 in 200 images; per image min 0 / mean 4.29 / median 4 /
              max 8; images without regions: 1
    boxes     area min 0.01758 / mean 0.09225 / max 0.2271; 0 zero-area, 0
              over 90% of the image
    conf      min 0.05326 / mean 0.6562 / max 0.9998
    tags      10 distinct; 22.4% of regions untagged; top: diamond 80, star
              80, circle 74
    captions  200; words min 3 / mean 12.98 / median 12 / max 29; tokens
              min 4 / mean 15.92 / median 14 / max 38
    anchors   98.0% of 200 captions have one; 2.15 per caption; 0: 4 |
              1: 70 | 2: 74 | 3+: 52
              top word -> tag: star -> star 54, heart -> heart 45, ...
              top unmatched tags (in the image, named by no word):
              diamond 21, triangle 20, ring 19
              named but no free region: ring 7, triangle 7, circle 6
    errors    none

(lines wrapped here; a bad record shows as `errors    3 (by field: caption
1, ...)` followed by one `file: record N: field 'X': problem` line each).

PATH is a region store (`regions.array_record`), a pair file
(`{split}.array_record`, meta.json beside it), a task file
(`{task}_{split}.array_record`), an image store (`images.json`: image files
+ boxes, image_store.ImageStore) or a folder (every `*.array_record` in it,
and its images.json).
What a file holds is told from its records' fields (the file name only
breaks ties). Options: --limit=N (first N records only), --json (the report
as one JSON object), --top=K, --max_errors=N (errors printed; all counted).
Exits 1 if any error was found, 2 if PATH does not exist (one line,
`inspect: error: ...`; --verbose: the traceback).

Every record is validated with the pipeline's own checks
(records.validate_pair and, with meta.json, the tag vocabulary check of
pipeline.decode_pair; region_store.validate_region_record;
task_pipeline.validate_task_example plus "its images are in the store");
a bad record is listed as `file: record N: field 'X': problem` and left
out of the statistics, and the scan goes on.

Records for a model that reads pixels (model.visual.input='pixels') carry
their encoded image (`image`: PNG or JPEG bytes). One without region_feats
is checked as the pixel pipeline checks it (validate_pair /
validate_region_record with visual='pixels'); one with both is checked both
ways. Every image is decoded by image_store.decode_image, the pipeline's
decoder: one that does not decode is `file: record N: field 'image': ...`.
The `pixels` line gives their count, formats, decoded sizes and encoded
bytes. An image store's listed images are read and decoded as fine-tuning
reads them (image_store.ImageStore[id]): a missing or corrupt file is an
error naming the file and the image id; there are no captions, so no
anchors.

Anchors are found by anchors.detect_anchors, as pipeline.encode_pair does,
but over the whole record: no max_regions / max_text_len / max_anchors cut
(those belong to a run config, not to the data). Task files pair each text
with each image the fine-tuning pipeline feeds it with (NLVR2: the sentence
with both images; retrieval: every caption with its image).

Memory stays flat in the number of records except for one hash per distinct
image id (to count images and describe each image once).
"""

import argparse
import json
import os
import sys
import traceback

from cmal_jax import cli_errors
from cmal_jax.convert.inspect_format import format_report
from cmal_jax.convert.inspect_images import inspect_image_store
from cmal_jax.convert.inspect_pairs import scan_pairs
from cmal_jax.convert.inspect_regions import scan_regions
from cmal_jax.convert.inspect_scan import PAIR, REGIONS, detect_kind, open_scan
from cmal_jax.convert.inspect_tasks import scan_task
from cmal_jax.data import image_store
from cmal_jax.data import tasks

RECORD_SUFFIX = '.array_record'


# ----------------------------------------------------------------- reports

def inspect_file(path: str, limit: int | None = None, top: int = 10,
                 max_errors: int = 20) -> dict:
  """The report of one record file (see the module docstring)."""
  scan = open_scan(path, limit, max_errors)
  if isinstance(scan, dict):
    return scan
  kind = detect_kind(scan)
  report = dict(path=path, kind=kind, task=None, records=scan.num_records,
                inspected=scan.num_inspected, limit=limit)
  if kind == PAIR:
    report.update(scan_pairs(scan, top))
  elif kind == REGIONS:
    report.update(scan_regions(scan, top))
  elif kind in tasks.TASKS:
    report.update(kind='task', task=kind, **scan_task(scan, kind, top))
  elif scan.num_records:
    scan.errors.add_file(path, 'cannot tell what this file holds: its '
                         'records have neither pair, region nor task fields')
  report.update(scan.errors.to_dict())
  return report


def inspect_path(path: str, limit: int | None = None, top: int = 10,
                 max_errors: int = 20) -> dict:
  """The report of a record file or image store, or of every record file
  (and the image store) in a folder.

  A folder's report is {path, kind: 'folder', files: [file reports, the
  images.json one last], num_errors: their total}. Raises
  FileNotFoundError for a missing path.
  max_errors bounds the error messages kept per file (all are counted).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such file or folder')
  if not os.path.isdir(path):
    if os.path.basename(path) == image_store.IMAGE_STORE_FILE:
      return inspect_image_store(path, limit, top, max_errors)
    return inspect_file(path, limit, top, max_errors)
  names = sorted(n for n in os.listdir(path) if n.endswith(RECORD_SUFFIX))
  files = [inspect_file(os.path.join(path, n), limit, top, max_errors)
           for n in names]
  images_json = image_store.store_file(path)
  if os.path.isfile(images_json):  # An image folder.
    files.append(inspect_image_store(images_json, limit, top, max_errors))
  report = dict(path=path, kind='folder', files=files,
                num_errors=sum(f['num_errors'] for f in files))
  if not files:
    report.update(num_errors=1, errors=[
        f'{path}: no {RECORD_SUFFIX} files nor '
        f'{image_store.IMAGE_STORE_FILE} in this folder'])
  return report


# -------------------------------------------------------------------- main

TOOL = 'inspect'


def main(argv=None) -> int:
  """Prints the report; returns the exit code (1: errors found, 2: no
  such path, `inspect: error: ...` on one line)."""
  ap = argparse.ArgumentParser(
      prog='python -m cmal_jax.convert.inspect',
      description=__doc__.split('\n')[0])
  ap.add_argument('path', help='a record file or a folder of them')
  ap.add_argument('--limit', type=int, default=None,
                  help='inspect only the first N records of each file')
  ap.add_argument('--json', action='store_true',
                  help='print the report as one JSON object')
  ap.add_argument('--top', type=int, default=10,
                  help='how many tags / anchors to list')
  ap.add_argument('--max_errors', type=int, default=20,
                  help='errors to print per file (all are counted)')
  cli_errors.add_verbose_flag(ap)
  args = ap.parse_args(argv)
  if args.limit is not None and args.limit < 0:
    ap.error('--limit must be >= 0')
  try:
    report = inspect_path(args.path, args.limit, args.top, args.max_errors)
  except FileNotFoundError as e:
    if args.verbose:  # The traceback, and still exit status 2.
      traceback.print_exc()
    print(cli_errors.error_line(TOOL, e), file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(report, indent=1))
  else:
    print(format_report(report, args.max_errors))
  return 1 if report['num_errors'] else 0


if __name__ == '__main__':
  sys.exit(cli_errors.run_tool(TOOL, main))
