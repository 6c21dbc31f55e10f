"""Downstream task examples: the one schema that every source writes.

The official-format readers (`cmal_jax/convert/formats/`) and the synthetic
world's task generator (`cmal_jax/world/task_examples.py`) both produce these
dicts, so fine-tuning never sees where an example came from. An example
names its image(s) by id; the visual side (regions) comes from a region
store (`cmal_jax/data/region_store.py`) that returns a region record for an
id, so detector features, image files and the synthetic world plug in
through one interface.

Task examples (plain JSON-able values; stored as msgpack in ArrayRecord files
`{task}_{split}.array_record` next to the region store):

  vqa:       question_id: int, image_id: str, question: str,
             answers: list[str]  (every annotator's raw answer, VQA v2 has
                                  10; [] when the split has no labels),
             question_type: str, answer_type: str
  ve:        pair_id: str, image_id: str, hypothesis: str,
             label: one of VE_LABELS
  nlvr2:     identifier: str, image_ids: [left: str, right: str],
             sentence: str, label: bool
  rec:       ref_id: int, sent_id: int (one example per referring
             sentence; a ref may have several), image_id: str,
             expression: str, target_box: [x1, y1, x2, y2] normalised to
             [0, 1] by the image size (the same convention as region_boxes)
  retrieval: image_id: str, captions: list[str]

A region record (what a store returns for an image id) has the pair
record's visual fields (see records.py): region_feats float32 [N, F],
region_boxes float32 [N, 4], region_tags list[str] ("" = no tag),
region_conf float32 [N].
"""

import os

TASKS = ('vqa', 've', 'nlvr2', 'rec', 'retrieval')
VE_LABELS = ('entailment', 'neutral', 'contradiction')
REGION_FIELDS = ('region_feats', 'region_boxes', 'region_tags', 'region_conf')

# Fields of each task's examples (see the module docstring for the types).
TASK_FIELDS = {
    'vqa': ('question_id', 'image_id', 'question', 'answers',
            'question_type', 'answer_type'),
    've': ('pair_id', 'image_id', 'hypothesis', 'label'),
    'nlvr2': ('identifier', 'image_ids', 'sentence', 'label'),
    'rec': ('ref_id', 'sent_id', 'image_id', 'expression', 'target_box'),
    'retrieval': ('image_id', 'captions'),
}


def task_path(directory: str, task: str, split: str) -> str:
  """Where a task split's ArrayRecord file lives in a dataset folder."""
  if task not in TASKS:
    raise ValueError(f'unknown task {task!r}; tasks are {list(TASKS)}')
  return os.path.join(directory, f'{task}_{split}.array_record')
