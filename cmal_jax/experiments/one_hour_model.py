"""The one-hour baseline's model (one_hour_baseline.py): what a practitioner
writes first for a vision-language task without pre-training.

  text     bag of words: learned embeddings of the WordPiece ids, their
           mean over the text mask -> [B, D].
  visual   one vector per region -> [B, R, D]: an MLP over the region's
           features (LayerNorm first: detector features come at any
           scale) concatenated with its box. Pixels: a 2-layer CNN over
           the image, RoIAlign-pooled over each box (model/pixels.py's
           pool_regions), then the same MLP.
  pooling  attention over the regions with the text as the query
           (TextAttentionPool): a question or hypothesis is about one or two
           of the objects, and a plain mean would blend their colours and
           shapes into one bag of attributes.
  fusion   [text, image, text * image] -> MLP -> the task's head.

Heads (inputs as fine-tuning's, finetune.model_inputs; outputs named as
the CMAL model's, so finetune.task_loss and make_predict_step read them):
  vqa        logits [B, V] over the answer vocabulary (each starts at
             -log V, as the project's VQA head).
  ve         logits [B, 3].
  nlvr2      rows [2B] (left, right of each example): both fused vectors
             concatenated -> logits [B, 2].
  rec        one score per region from [region, text, region * text]
             -> logits [B, R], -1e9 on padded slots.
  retrieval  a dual encoder: itc_text, itc_image [B, D] unit vectors and
             itc_log_scale (log 1/temperature) for an in-batch contrastive
             loss. The image side is the masked mean of the regions: a
             dual encoder embeds each image without its caption, so there
             is no text to attend with.
"""

import math

import flax.linen as nn
import jax.numpy as jnp

from cmal_jax.model.cmal import masked_mean
from cmal_jax.model.pixels import pool_regions
from cmal_jax.model.umse import l2_normalize

# Channels of the CNN's first convolution; its second has the model's width D.
CNN_WIDTH = 32
# CLIP's initial temperature, 0.07, as log(1 / tau).
INITIAL_LOG_SCALE = math.log(1 / 0.07)


class BagOfWords(nn.Module):
  """input_ids [B, T], text_mask [B, T] -> [B, D]: the mean of the tokens'
  learned embeddings ([CLS] and [SEP] too: a constant offset). Word order
  is lost, which is part of what this baseline measures."""
  vocab_size: int
  dim: int

  @nn.compact
  def __call__(self, input_ids, text_mask):
    embedded = nn.Embed(self.vocab_size, self.dim, name='embed')(input_ids)
    return masked_mean(embedded, text_mask)


class RegionMLP(nn.Module):
  """feats [B, R, F], boxes [B, R, 4] -> [B, R, D]: two dense layers over
  each region's (normalised) features and its box."""
  dim: int

  @nn.compact
  def __call__(self, feats, boxes):
    x = jnp.concatenate([nn.LayerNorm(name='feat_norm')(feats), boxes], -1)
    x = nn.gelu(nn.Dense(self.dim, name='dense_0')(x))
    return nn.Dense(self.dim, name='dense_1')(x)


class PixelCNN(nn.Module):
  """images [B, S, S, 3] (uint8) -> feature map [B, S/4, S/4, D]: two 3x3
  convolutions of stride 2 with GELU."""
  dim: int

  @nn.compact
  def __call__(self, images):
    x = images.astype(jnp.float32) / 255.0 - 0.5
    x = nn.gelu(nn.Conv(CNN_WIDTH, (3, 3), strides=2, name='conv_0')(x))
    return nn.gelu(nn.Conv(self.dim, (3, 3), strides=2, name='conv_1')(x))


class TextAttentionPool(nn.Module):
  """regions [B, R, D], region_mask [B, R], text [B, D] -> [B, D]: the
  regions weighted by a softmax over <W_q text, W_k region> / sqrt(D)."""
  dim: int

  @nn.compact
  def __call__(self, regions, region_mask, text):
    query = nn.Dense(self.dim, name='query')(text)  # [B, D]
    keys = nn.Dense(self.dim, name='key')(regions)  # [B, R, D]
    scores = jnp.einsum('bd,brd->br', query, keys) / math.sqrt(self.dim)
    scores = jnp.where(region_mask > 0, scores, -1e9)
    weights = nn.softmax(scores, -1)
    return jnp.einsum('br,brd->bd', weights, regions)


class FusionMLP(nn.Module):
  """text, image [B, D] -> [B, D]: an MLP over [text, image, text * image],
  the product letting a dense layer see which attributes agree."""
  dim: int

  @nn.compact
  def __call__(self, text, image):
    x = jnp.concatenate([text, image, text * image], -1)
    x = nn.gelu(nn.Dense(2 * self.dim, name='dense_0')(x))
    return nn.gelu(nn.Dense(self.dim, name='dense_1')(x))


class OneHourBaseline(nn.Module):
  """The baseline of one task (module docstring). Inputs as fine-tuning's
  (finetune.model_inputs): input_ids, text_mask [B, T]; region_feats
  [B, R, F] or (pixels) images [B, S, S, 3]; region_boxes [B, R, 4];
  region_mask [B, R]; nlvr2 has 2B rows, each example's two images."""
  task: str
  vocab_size: int
  dim: int
  pixels: bool = False
  num_outputs: int = 0  # vqa: the answer vocabulary size.
  roi_size: int = 4  # pixels: RoIAlign bins per side (model.visual).
  sampling_ratio: int = 2  # pixels: bilinear samples per bin and axis.

  def setup(self):
    if self.task == 'vqa' and self.num_outputs < 1:
      raise ValueError(f'num_outputs={self.num_outputs}: the vqa head needs '
                       'the answer vocabulary size')
    self.text_encoder = BagOfWords(self.vocab_size, self.dim)
    if self.pixels:
      self.cnn = PixelCNN(self.dim)
    self.region_mlp = RegionMLP(self.dim)
    if self.task == 'retrieval':
      self.text_proj = nn.Dense(self.dim)
      self.image_proj = nn.Dense(self.dim)
      self.log_scale = self.param(
          'log_scale', nn.initializers.constant(INITIAL_LOG_SCALE), ())
      return
    self.pool = TextAttentionPool(self.dim)
    self.fusion = FusionMLP(self.dim)
    if self.task == 'vqa':
      self.head = nn.Dense(self.num_outputs, bias_init=nn.initializers.constant(
          -math.log(self.num_outputs)))
    elif self.task == 've':
      self.head = nn.Dense(3)
    elif self.task == 'nlvr2':
      self.pair_mlp = nn.Dense(self.dim)
      self.head = nn.Dense(2)
    elif self.task == 'rec':
      self.region_scorer = FusionMLP(self.dim)
      self.head = nn.Dense(1)
    else:
      raise ValueError(f'task={self.task!r}: one of vqa, ve, nlvr2, rec, '
                       'retrieval')

  def embed_text(self, inputs):
    """input_ids, text_mask [B, T] -> [B, D]."""
    return self.text_encoder(inputs['input_ids'], inputs['text_mask'])

  def embed_regions(self, inputs):
    """region_feats [B, R, F] (or images [B, S, S, 3]), region_boxes
    [B, R, 4], region_mask [B, R] -> [B, R, D]."""
    boxes = inputs['region_boxes']
    if self.pixels:
      feats = pool_regions(self.cnn(inputs['images']), boxes,
                           inputs['region_mask'], self.roi_size,
                           self.sampling_ratio)
    else:
      feats = inputs['region_feats']
    return self.region_mlp(feats, boxes)

  def itc_text(self, inputs):
    """retrieval: captions -> unit vectors [B, D]."""
    return l2_normalize(self.text_proj(self.embed_text(inputs)))

  def itc_image(self, inputs):
    """retrieval: images -> unit vectors [B, D] (the regions' mean)."""
    regions = self.embed_regions(inputs)
    return l2_normalize(self.image_proj(
        masked_mean(regions, inputs['region_mask'])))

  def __call__(self, inputs):
    """-> {'logits'} (retrieval: {'itc_text', 'itc_image',
    'itc_log_scale'}); shapes in the module docstring."""
    if self.task == 'retrieval':
      return dict(itc_text=self.itc_text(inputs),
                  itc_image=self.itc_image(inputs),
                  itc_log_scale=self.log_scale)
    text = self.embed_text(inputs)  # [B, D]
    regions = self.embed_regions(inputs)  # [B, R, D]
    mask = inputs['region_mask']
    if self.task == 'rec':
      per_region = jnp.broadcast_to(text[:, None], regions.shape)
      logits = self.head(self.region_scorer(per_region, regions))[..., 0]
      return {'logits': jnp.where(mask > 0, logits, -1e9)}
    fused = self.fusion(text, self.pool(regions, mask, text))  # [B, D]
    if self.task == 'nlvr2':  # [2B, D] -> [B, 2D]: left and right.
      fused = fused.reshape(fused.shape[0] // 2, 2 * self.dim)
      fused = nn.gelu(self.pair_mlp(fused))
    return {'logits': self.head(fused)}
