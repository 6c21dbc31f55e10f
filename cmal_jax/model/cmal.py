"""The CMAL model: UMSE -> CMAP -> unified encoder -> heads."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmal_jax.model import amc, axes, cmap, heads
from cmal_jax.model.umse import TextEncoder, VisionEncoder, l2_normalize
from cmal_jax.model.pixels import PixelBackbone, PixelConfig, pixel_config
from cmal_jax.model.layers import BertEncoder, EncoderConfig
from cmal_jax.model.unified import SlotEmbeddings, two_stream_masks


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  hidden_dim: int
  num_heads: int
  mlp_dim: int
  text_layers: int
  vision_layers: int
  unified_layers: int
  dropout: float
  vocab_size: int
  num_tags: int
  max_position: int
  # Compute dtype: 'float32', 'bfloat16' or 'float16'. Parameters stay
  # float32; softmaxes, LayerNorm statistics, the unit-sphere features and
  # every logit stay float32 (see model/layers.py).
  dtype: str = 'float32'
  # Rematerialise encoder layers: 'none', 'full', 'dots', 'dots_no_batch'
  # (layers.REMAT_POLICIES).
  remat: str = 'none'
  # UMSE ends on the unit hypersphere (the paper); False is the ablation:
  # the features enter CMAP unnormalised (ITC still compares unit vectors).
  hypersphere: bool = True
  # Where the features CMAP moves come from: 'none', a second UMSE pass
  # that adds no position or box, so a moved feature carries its content
  # and no place (pairing cannot be solved by place); 'carried', the UMSE
  # pass whose other features stay (the paper's), so it also carries the
  # place it came from. docs/method.md, "What a moved feature carries".
  moved_place: str = 'none'
  # The pixel backbone that turns images into region features
  # (model.visual.input='pixels'), or None: region features come as input.
  pixels: PixelConfig | None = None
  # SemVLP: the unified encoder's layers carry a cross-modal attention
  # sub-layer; two_stream is the mode a call runs in unless it says (False:
  # single-stream, the sub-layer unused).
  cross_attention: bool = False
  two_stream: bool = False
  # SemMIM: K, the prototypes of the encoding space shared by patch
  # encodings and the global image feature (0: no prototype head).
  prototypes: int = 0
  # What the VQA / VE / NLVR2 head reads (heads.HEAD_INPUTS): 'cls', the
  # [CLS] output (UNITER's); 'cls_and_regions', [CLS] beside the region
  # slots pooled by a learned score.
  head_input: str = 'cls'

  @classmethod
  def from_config(cls, model_config, num_tags):
    fields = {f.name for f in dataclasses.fields(cls)} - {'num_tags',
                                                          'pixels'}
    return cls(num_tags=num_tags, pixels=pixel_config(model_config),
               **{k: v for k, v in model_config.items() if k in fields})

  def encoder(self, num_layers, cross_attention=False):
    return EncoderConfig(self.hidden_dim, self.num_heads, self.mlp_dim,
                         num_layers, self.dropout, jnp.dtype(self.dtype),
                         remat=self.remat, cross_attention=cross_attention)


# Parameters a fine-tuning run takes from a pre-trained checkpoint.
ENCODER_PARAMS = ('text_encoder', 'vision_encoder', 'text_scale',
                  'vision_scale', 'mask_vector', 'slots', 'unified')


# The inputs that describe the image (the rest describe the text): what
# moves when a caption is paired with another image.
IMAGE_INPUTS = ('region_feats', 'images', 'region_boxes', 'region_mask',
                'umse_boxes')


# The pixel backbone's parameters (a model that reads pixels has them).
PIXEL_PARAMS = 'pixels'


def pretrained_param_names(task, pixels=False):
  """The top-level parameters `task` starts from when fine-tuning from a
  pre-trained checkpoint: the encoders (with pixels, the backbone too), and
  for retrieval the ITM head and the ITC temperature."""
  return (ENCODER_PARAMS + ((PIXEL_PARAMS,) if pixels else ())
          + (('itm_head', 'itc_log_scale') if task == 'retrieval' else ()))


class CMAL(nn.Module):
  """UMSE -> CMAP -> unified encoder -> the heads of `task`.

  task='pretrain': every pre-training head in one pass; the objectives pick
  what they use (XLA drops the rest). Inputs (dict; shapes B batch, T text,
  R regions, K anchors, M predictions): input_ids, text_mask [B, T];
  region_feats [B, R, F]; region_boxes [B, R, 4]; region_mask [B, R];
  anchor_text_pos, anchor_text_end, anchor_region, anchor_action [B, K];
  mlm_positions [B, M].

  With config.pixels, images [B, S, S, 3] (uint8, or float in [0, 1])
  replace region_feats: the backbone pools one feature per region box, and
  the optional region_masked [B, R] bool zeroes the pooled features of
  MRC's masked regions (what the corruption does to region_feats).

  Downstream tasks (CMAP off: no anchor inputs) return {'logits': ...}:
    vqa [B, num_outputs answers], ve [B, 3], rec [B, R] (one score per
    region slot, -1e9 on padding), retrieval [B, 2] (the ITM head, plus
    itc_text, itc_image [B, D] and itc_log_scale for ITC);
    nlvr2 takes the two images of each example as consecutive rows
    [2B, ...] (left of example b at 2b, right at 2b + 1, the statement in
    both) and returns [B, 2] from the two [CLS] outputs concatenated.
  """
  config: ModelConfig
  task: str = 'pretrain'
  num_outputs: int = 0  # vqa: the answer vocabulary size.

  def setup(self):
    c = self.config
    self.text_encoder = TextEncoder(c.encoder(c.text_layers), c.vocab_size,
                                    c.max_position, unit=c.hypersphere)
    self.vision_encoder = VisionEncoder(c.encoder(c.vision_layers),
                                        unit=c.hypersphere)
    if c.pixels is not None:
      self.pixels = PixelBackbone(c.pixels)
    # Maps each unit sphere back to the unified encoder's range (elements
    # of size ~1); unnormalised projections are there already.
    scale_init = lambda *_: jnp.float32(
        math.sqrt(c.hidden_dim) if c.hypersphere else 1.0)
    self.text_scale = self.param('text_scale', axes.init(scale_init, ()), ())
    self.vision_scale = self.param('vision_scale', axes.init(scale_init, ()),
                                   ())
    self.mask_vector = self.param(
        'mask_vector', axes.init(nn.initializers.normal(1.0), ('embed',)),
        (c.hidden_dim,))
    unified_cfg = c.encoder(c.unified_layers, c.cross_attention)
    self.slots = SlotEmbeddings(unified_cfg, c.max_position)
    self.unified = BertEncoder(unified_cfg)
    if self.task in ('pretrain', 'retrieval'):
      self.itm_head = heads.ITMHead(unified_cfg)
      # ITC temperature, as log(1/tau), CLIP's initial tau = 0.07.
      self.itc_log_scale = self.param(
          'itc_log_scale', axes.init(
              lambda *_: jnp.log(jnp.float32(1 / 0.07)), ()), ())
    if self.task not in ('pretrain', 'retrieval'):
      self.task_head = _task_head(self.task, unified_cfg, self.num_outputs,
                                  c.head_input == 'cls_and_regions')
    if self.task != 'pretrain':
      return
    self.vocab_head = heads.VocabHead(unified_cfg, c.vocab_size)
    self.tag_head = heads.TagHead(unified_cfg, c.num_tags)
    self.pairing_head = amc.PairingHead(unified_cfg)
    if c.prototypes:
      self.prototype_head = heads.PrototypeHead(unified_cfg, c.prototypes)

  def embed_text(self, inputs, deterministic=True, place=True):
    """UMSE text side: unit features [B, T, D] (unnormalised without the
    hypersphere, as are all "unit" features below). The optional
    text_positions [B, T] are the position ids the tokens read (default
    their own); place=False: none."""
    return self.text_encoder(inputs['input_ids'], inputs['text_mask'],
                             deterministic, inputs.get('text_positions'),
                             place)

  def embed_regions(self, inputs, deterministic=True, place=True):
    """UMSE visual side: unit features [B, R, D]. The content comes from
    region_feats (pixels: pooled at region_boxes), the place from the
    optional umse_boxes [B, R, 4] (default region_boxes); place=False:
    none."""
    feats = (inputs['region_feats'] if self.config.pixels is None
             else self.region_feats_from_pixels(inputs))
    boxes = inputs.get('umse_boxes', inputs['region_boxes'])
    return self.vision_encoder(feats, boxes, inputs['region_mask'],
                               deterministic, place)

  def region_feats_from_pixels(self, inputs):
    """The backbone's region features [B, R, C]: RoIAlign over each region
    box of images [B, S, S, 3]; zero on padding and where region_masked
    (MRC), as a detector's masked features would be."""
    feats = self.pixels.regions_from_pixels(
        inputs['images'], inputs['region_boxes'], inputs['region_mask'],
        inputs.get('patch_masked'))
    if 'region_masked' in inputs:
      feats = jnp.where(inputs['region_masked'][..., None], 0, feats)
    return feats

  def fuse(self, text_unit, region_unit, inputs, deterministic=True,
           two_stream=None, moved_units=None):
    """CMAP (when the inputs carry anchor actions) and the unified encoder
    over UMSE unit features: [B, T, D], [B, R, D] -> [B, T + R, D]. Split
    from encode() so retrieval can embed each caption and image once and
    fuse only the pairs it scores. two_stream: SemVLP's mode (None: the
    config's). moved_units: (text [B, T, D], regions [B, R, D]), where the
    features CMAP moves are taken from (default the same features)."""
    # Float32 unit features, scaled, then CMAP and on in the compute dtype.
    dt = jnp.dtype(self.config.dtype)
    scale = lambda t, r: ((t * self.text_scale).astype(dt),
                          (r * self.vision_scale).astype(dt))
    text, regions = scale(text_unit, region_unit)
    if 'anchor_action' in inputs:
      moved = scale(*moved_units) if moved_units is not None else (None,
                                                                   None)
      text, regions = cmap.swap_anchor_features(
          text, regions, inputs['anchor_text_pos'], inputs['anchor_text_end'],
          inputs['anchor_region'], inputs['anchor_action'], self.mask_vector,
          *moved)
    x = self.slots(text, regions, inputs['region_boxes'], deterministic)
    if two_stream is None:
      two_stream = self.config.two_stream
    # Initialisation creates the cross-attention sub-layer whichever mode
    # runs first.
    if self.config.cross_attention and self.is_initializing():
      two_stream = True
    if two_stream:
      mask, cross_mask = two_stream_masks(inputs['text_mask'],
                                          inputs['region_mask'])
      return self.unified(x, mask, deterministic, cross_mask)
    mask = jnp.concatenate([inputs['text_mask'], inputs['region_mask']], 1)
    return self.unified(x, mask, deterministic)

  def encode(self, inputs, deterministic=True, two_stream=None):
    """UMSE, CMAP and the unified encoder. Returns (x [B, T + R, D],
    text_unit [B, T, D], region_unit [B, R, D]): the unified outputs and the
    UMSE unit features."""
    text_unit = self.embed_text(inputs, deterministic)
    region_unit = self.embed_regions(inputs, deterministic)
    moved_units = None
    own_pass = self.config.moved_place == 'none'
    if 'anchor_action' in inputs and (own_pass or 'moved' in inputs):
      # CMAP moves features of another UMSE pass over inputs['moved']
      # (objectives.prepare_inputs: the pair without the anchors hidden;
      # controls.py: with place or content exchanged).
      source = {**inputs, **inputs.get('moved', {})}
      moved_units = (self.embed_text(source, deterministic, not own_pass),
                     self.embed_regions(source, deterministic, not own_pass))
    return (self.fuse(text_unit, region_unit, inputs, deterministic,
                      two_stream, moved_units), text_unit, region_unit)

  def itm_on_mined_negatives(self, inputs, pick_negatives,
                             deterministic=True):
    """Retrieval training as ALBEF: every row of `inputs` [B, ...] a
    matched pair. UMSE runs once; pick_negatives(ITC similarity [B, B]
    without gradient, ITC's log(1 / tau)) -> (the negative image of each
    caption [B], the negative caption of each image [B]), row indices
    (objectives.mine_hard_negatives). The unified encoder then reads
    the B matched pairs, each caption with its negative image and each
    image with its negative caption: 'logits' [3B, 2] and their
    'itm_label' [3B] (1, then 0), beside the ITC features of __call__."""
    text_unit = self.embed_text(inputs, deterministic)
    region_unit = self.embed_regions(inputs, deterministic)
    itc_text, itc_image = itc_features(text_unit, region_unit,
                                       inputs['region_mask'])
    image_of_text, text_of_image = pick_negatives(
        jax.lax.stop_gradient(itc_text @ itc_image.T), self.itc_log_scale)
    rows = jnp.arange(itc_text.shape[0])
    text_rows = jnp.concatenate([rows, rows, text_of_image])
    image_rows = jnp.concatenate([rows, image_of_text, rows])
    pairs = {k: v[image_rows if k in IMAGE_INPUTS else text_rows]
             for k, v in inputs.items()}
    x = self.fuse(text_unit[text_rows], region_unit[image_rows], pairs,
                  deterministic)
    label = jnp.concatenate([jnp.ones_like(rows), jnp.zeros_like(rows),
                             jnp.zeros_like(rows)]).astype(jnp.int32)
    return {'logits': self.itm_head(x[:, 0]), 'itm_label': label,
            'itc_text': itc_text, 'itc_image': itc_image,
            'itc_log_scale': self.itc_log_scale}

  def itm_log_prob(self, text_unit, region_unit, inputs):
    """Retrieval scoring from cached UMSE features: log p(match) [B]."""
    x = self.fuse(text_unit, region_unit, inputs, True)
    return jax.nn.log_softmax(self.itm_head(x[:, 0]))[:, 1]

  def __call__(self, inputs, *, deterministic=True, two_stream=None):
    """two_stream: SemVLP's mode for this call (None: config.two_stream)."""
    x, text_unit, region_unit = self.encode(inputs, deterministic,
                                            two_stream)
    if self.task == 'retrieval':  # ITM head, and ITC on UMSE outputs.
      itc_text, itc_image = itc_features(text_unit, region_unit,
                                         inputs['region_mask'])
      return {'logits': self.itm_head(x[:, 0]), 'itc_text': itc_text,
              'itc_image': itc_image, 'itc_log_scale': self.itc_log_scale}
    if self.task != 'pretrain':
      return {'logits': self.task_head(x, inputs)}
    T = inputs['input_ids'].shape[1]
    text_out, region_out = x[:, :T], x[:, T:]

    # AMC (model/amc.py): at each anchor the text slot p_k and region o_k.
    at_word, at_region = amc.anchor_slots(text_out, region_out, inputs)
    # One vocabulary pass for the AMC words and the MLM positions: the
    # [*, V] logits and their gradient are most of a small model's step.
    K = at_word.shape[1]
    words = self.vocab_head(jnp.concatenate(
        [at_word, cmap.gather_slots(text_out, inputs['mlm_positions'])], 1),
                            self.text_encoder.attend)
    itc_text, itc_image = itc_features(text_unit, region_unit,
                                       inputs['region_mask'])
    out = {
        'amc_t2r_logits': self.pairing_head(
            at_word, region_out, inputs['region_mask'], 'text', 'region'),
        'amc_r2t_logits': self.pairing_head(
            at_region, text_out, inputs['text_mask'], 'region', 'text'),
        'amc_word_logits': words[:, :K],
        'amc_tag_logits': self.tag_head(at_region),
        'mlm_logits': words[:, K:],
        'mrc_logits': self.tag_head(region_out),
        'itm_logits': self.itm_head(x[:, 0]),
        # ITC uses UMSE outputs: text [CLS] and mean-pooled regions.
        'itc_text': itc_text,
        'itc_image': itc_image,
        'itc_log_scale': self.itc_log_scale,
    }
    if self.config.prototypes:  # SemMIM: patches and the image, [.., K].
      out['proto_patch_logits'] = self.prototype_head(region_out)
      out['proto_image_logits'] = self.prototype_head(
          masked_mean(region_out, inputs['region_mask']))
    return out

  def embed_units(self, inputs):
    """The UMSE unit features alone, (text [B, T - 1, D] without [CLS],
    regions [B, R, D]): evaluate.umse_spread's collapse check."""
    return self.embed_text(inputs)[:, 1:], self.embed_regions(inputs)

  def itc_embeddings(self, inputs):
    """UMSE-only pass for ITC retrieval: (text [B, D], image [B, D]), unit
    vectors; the same as __call__'s itc_text and itc_image."""
    return itc_features(self.embed_text(inputs), self.embed_regions(inputs),
                        inputs['region_mask'])


def itc_features(text_unit, region_unit, region_mask):
  """ITC's unit vectors from UMSE outputs: the text [CLS] feature and the
  pooled regions, (text [B, D], image [B, D]). Normalised here too, so ITC
  compares unit vectors with or without the hypersphere."""
  return (l2_normalize(text_unit[:, 0]),
          image_feature(region_unit, region_mask))


def masked_mean(x, mask):
  """Mean over the real slots: x [B, R, D], mask [B, R] -> [B, D]."""
  m = mask[..., None].astype(x.dtype)
  return jnp.sum(x * m, 1) / jnp.maximum(jnp.sum(m, 1), 1.0)


def image_feature(region_unit, region_mask):
  """ITC's image vector: the masked mean of unit region features,
  renormalised: [B, R, D] -> [B, D]."""
  return l2_normalize(masked_mean(region_unit, region_mask))


def _task_head(task, cfg, num_outputs, reads_regions=False):
  if task == 'vqa':
    if num_outputs < 1:
      raise ValueError('the vqa head needs num_outputs = the answer '
                       f'vocabulary size, got {num_outputs}')
    # sigmoid(-log N) ~ 1/N: about one answer of N is right.
    return heads.ClsClassifier(cfg, num_outputs, name='vqa_head',
                               initial_logit=-math.log(num_outputs),
                               reads_regions=reads_regions)
  if task == 've':
    return heads.ClsClassifier(cfg, 3, name='ve_head',
                               reads_regions=reads_regions)
  if task == 'nlvr2':
    return heads.ClsClassifier(cfg, 2, num_images=2, name='nlvr2_head',
                               reads_regions=reads_regions)
  if task == 'rec':
    return heads.RegionScorer(cfg, name='rec_head')
  # configlib.validate names the tasks to a user before a model is built.
  raise ValueError(f'CMAL has no head for task {task!r}')
