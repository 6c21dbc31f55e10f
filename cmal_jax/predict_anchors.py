"""What a pre-trained model pairs: the anchors of a caption with an image
and, per anchor, the region AMC's pairing head picks for its word.

  python -m cmal_jax.predict --workdir=runs/pretrain --step=latest \\
      --image=3 --caption="a red cube left of a ball"
  # cube -> region 2 (box [0.10, 0.20, 0.40, 0.50], tag cube)

  finder = AnchorFinder.from_workdir('runs/pretrain', 'latest')
  finder.anchors([3], ['a red cube left of a ball'])

Pre-training data are records of (caption, regions) pairs, not a store of
images by id, so an image here is a pair index of the run's evaluation
split (config.data.eval_split, the run's own data folder or data.source):
its regions are read, its caption is replaced by the one given.

The anchors are what the input pipeline finds (pipeline.encode_pair ->
anchors.detect_anchors: caption words naming a tag of a detected region);
the pairing is the model's, as evaluation measures it with every anchor
swapped (objectives.prepare_inputs(actions='all_swapped', corrupt=False),
the `amc_*_all_swapped` metrics): the argmax over the real regions of the
word slot's AMC t2r logits.
"""

import jax
import numpy as np

from cmal_jax import objectives
from cmal_jax.data import anchors as anchors_lib
from cmal_jax.data import pipeline, tfds_source
from cmal_jax.data.shapes import Shapes
from cmal_jax.data.tokenizer import load_tokenizer
from cmal_jax.export import export
from cmal_jax.model.cmal import CMAL, ModelConfig
from cmal_jax.world import synthetic

PROG = 'predict'


def anchor_word(caption, offsets, start, end):
  """The caption text of an anchor's word pieces [start, end) (token
  offsets: the encoding's char spans)."""
  return caption[offsets[start][0]:offsets[end - 1][1]]


class AnchorFinder:
  """A pre-training checkpoint and what its pairs need: the evaluation
  split's records, the tag vocabulary (meta.json) and the tokenizer."""

  def __init__(self, config, params, *, workdir, where):
    if config.task != 'pretrain':
      raise ValueError(f'{PROG}: {workdir} is a {config.task} workdir; '
                       'anchors() needs a pre-training one.')
    self.config, self.workdir, self.where = config, workdir, where
    directory = synthetic.data_dir(config, workdir)
    self.split = config.data.eval_split
    self.source, self.path, meta = tfds_source.open_pairs(config, directory,
                                                          self.split)
    self.vocab = anchors_lib.TagVocab.from_meta(meta)
    self.shapes = Shapes.from_config(config)
    self.tokenizer = load_tokenizer(config.data.vocab_path or None)
    self.specials = objectives.SpecialTokens.from_tokenizer(self.tokenizer)
    self.model = CMAL(ModelConfig.from_config(
        config.model, config.model.num_tags or self.vocab.num_tags))
    self.params = jax.device_put(params)
    self._t2r_probs = jax.jit(self._apply)

  @classmethod
  def from_workdir(cls, workdir, step='latest'):
    """The finder of a pre-training workdir's checkpoint `step` ('best',
    'latest' or N)."""
    config = export.read_run_config(workdir, what=PROG)
    params, where = export.load_params(workdir, export.parse_step(step),
                                       what=PROG)
    return cls(config, params, workdir=workdir, where=where)

  def pair(self, index):
    """The decoded pair at `index` of the evaluation split (its regions,
    region_tag_ids, caption, image_id); ValueError when out of range."""
    index = int(index)
    if not 0 <= index < len(self.source):
      raise ValueError(f'{PROG}: no pair {index} in {self.path} (it holds '
                       f'{len(self.source)}; an image of a pre-training '
                       'workdir is a pair index of its evaluation split)')
    return pipeline.decode_pair(self.source[index], path=self.path,
                                index=index, shapes=self.shapes,
                                vocab=self.vocab)

  def _apply(self, params, batch):
    """AMC t2r probabilities [B, K, R] (softmax over the regions; padding
    0) with every anchor swapped."""
    inputs, _ = objectives.prepare_inputs(
        batch, jax.random.key(0), self.config, self.specials,
        actions='all_swapped', corrupt=False)
    return jax.nn.softmax(
        self.model.apply({'params': params}, inputs)['amc_t2r_logits'])

  def encode(self, images, captions):
    """The pre-training batch of each caption with its pair's regions (the
    pipeline's encoder: anchors found as in training), as one batch [B, ...]
    with itm_label 1 (the caption is taken to describe the image)."""
    rows = [pipeline.encode_pair(c, self.pair(i), self.tokenizer,
                                 self.vocab, self.shapes)[0]
            for i, c in zip(images, captions)]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    batch['itm_label'] = np.ones(len(rows), np.int32)
    return batch

  def anchors(self, images, captions):
    """Per caption (with the pair index in `images`), its anchors, in
    caption order: [{'word', 'region' (the slot AMC pairs it with), 'score'
    (its softmax probability over the regions), 'box' (normalised x1 y1 x2
    y2), 'tag' (the region's tag, '' for none), 'detected_region' (the
    region the anchor finder paired the word with)}]."""
    if len(images) != len(captions) or not images:
      raise ValueError('anchors(): expected non-empty lists of one length, '
                       f'got lengths {[len(images), len(captions)]}.')
    batch = self.encode(images, captions)
    probs = np.asarray(jax.device_get(self._t2r_probs(self.params, batch)))
    results = []
    for n, caption in enumerate(captions):
      offsets = self.tokenizer.encode(caption, self.shapes.max_text_len).offsets
      found = []
      for k in np.flatnonzero(batch['anchor_valid'][n]):
        r = int(probs[n, k].argmax())
        tag = int(batch['region_tags'][n, r])
        found.append(dict(
            word=anchor_word(caption, offsets, batch['anchor_text_pos'][n, k],
                             batch['anchor_text_end'][n, k]),
            region=r, score=float(probs[n, k, r]),
            box=[float(x) for x in batch['region_boxes'][n, r]],
            tag=self.vocab.tags[tag] if tag >= 0 else '',
            detected_region=int(batch['anchor_region'][n, k])))
      results.append(found)
    return results
