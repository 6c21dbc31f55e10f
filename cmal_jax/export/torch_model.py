"""The PyTorch mirror of `cmal_jax.model.cmal.CMAL`: the same computation
(UMSE, CMAP with the anchor swap, the unified encoder, every pre-training
and task head) with the same parameter tree, named by `torch_names.py`.

    from cmal_jax.export.torch_model import CMAL
    model = CMAL.from_pretrained('runs/export')  # model.safetensors + config.json
    out = model({k: torch.as_tensor(v) for k, v in inputs.items()})

Inputs and outputs are those of the JAX model (see its docstring). Only
this module imports torch; `python -m cmal_jax.export` writes without it.
It needs neither JAX nor Flax (only `jax_params` does), so a PyTorch
deployment can load an export without them.
"""

import json
import math
import os

import torch
from torch import nn
import torch.nn.functional as F

# CMAP's anchor actions, as cmal_jax.model.cmap numbers them.
NONE, SWAP, MASK, KEEP = 0, 1, 2, 3

CONFIG_FILE, WEIGHTS_FILE = 'config.json', 'model.safetensors'


def l2_normalize(x):
  x = x.float()
  return x * torch.rsqrt(torch.sum(x * x, -1, keepdim=True) + 1e-12)


def end_on_sphere(x, unit):
  return l2_normalize(x) if unit else x.float()


def location_features(boxes):
  """[B, R, 4] -> UNITER's 7-d location [B, R, 7]."""
  x1, y1, x2, y2 = boxes.unbind(-1)
  w, h = x2 - x1, y2 - y1
  return torch.stack([x1, y1, x2, y2, w, h, w * h], -1)


def gather_slots(x, idx):
  """x [B, L, D], idx [B, K] -> [B, K, D]."""
  return torch.gather(x, 1, idx.long()[..., None].expand(-1, -1, x.shape[-1]))


class Attention(nn.Module):
  """Named as Hugging Face's BertAttention: self.{query,key,value}, output.
  {dense,LayerNorm}."""

  def __init__(self, c):
    super().__init__()
    D = c['hidden_dim']
    self.num_heads, self.dropout = c['num_heads'], c['dropout']
    self.self = nn.Module()
    for name in ('query', 'key', 'value'):
      setattr(self.self, name, nn.Linear(D, D))
    self.output = nn.Module()
    self.output.dense = nn.Linear(D, D)
    self.output.LayerNorm = nn.LayerNorm(D, eps=c['layer_norm_eps'])

  def forward(self, x, mask):
    B, L, D = x.shape
    H = self.num_heads
    split = lambda t: t.view(B, L, H, D // H)
    q, k, v = (split(getattr(self.self, n)(x)) for n in ('query', 'key',
                                                          'value'))
    logits = torch.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(D // H)
    logits = logits.masked_fill(mask[:, None, None, :] <= 0,
                                torch.finfo(logits.dtype).min)
    probs = F.dropout(torch.softmax(logits.float(), -1).to(x.dtype),
                      self.dropout, self.training)
    out = torch.einsum('bhqk,bkhd->bqhd', probs, v).reshape(B, L, D)
    out = F.dropout(self.output.dense(out), self.dropout, self.training)
    return self.output.LayerNorm(x + out)


class BertLayer(nn.Module):
  """Post-LN, exact GELU: Hugging Face's BertLayer, names included."""

  def __init__(self, c):
    super().__init__()
    D, eps = c['hidden_dim'], c['layer_norm_eps']
    self.dropout = c['dropout']
    self.attention = Attention(c)
    self.intermediate = nn.Module()
    self.intermediate.dense = nn.Linear(D, c['mlp_dim'])
    self.output = nn.Module()
    self.output.dense = nn.Linear(c['mlp_dim'], D)
    self.output.LayerNorm = nn.LayerNorm(D, eps=eps)

  def forward(self, x, mask):
    x = self.attention(x, mask)
    h = self.output.dense(F.gelu(self.intermediate.dense(x)))
    return self.output.LayerNorm(x + F.dropout(h, self.dropout,
                                               self.training))


class BertEncoder(nn.Module):
  def __init__(self, c, num_layers):
    super().__init__()
    self.layer = nn.ModuleList(BertLayer(c) for _ in range(num_layers))

  def forward(self, x, mask):
    for layer in self.layer:
      x = layer(x, mask)
    return x


class TextEncoder(nn.Module):
  def __init__(self, c):
    super().__init__()
    D = c['hidden_dim']
    self.dropout = c['dropout']
    self.word_embeddings = nn.Embedding(c['vocab_size'], D)
    self.position_embeddings = nn.Embedding(c['max_position'], D)
    self.LayerNorm = nn.LayerNorm(D, eps=c['layer_norm_eps'])
    self.encoder = BertEncoder(c, c['text_layers'])
    self.sphere = nn.Linear(D, D)
    self.unit = c.get('hypersphere', True)

  def forward(self, input_ids, text_mask, place=True):
    T = input_ids.shape[1]
    x = self.word_embeddings(input_ids.long())
    if place:
      x = x + self.position_embeddings(
          torch.arange(T, device=input_ids.device))[None]
    x = F.dropout(self.LayerNorm(x), self.dropout, self.training)
    return end_on_sphere(self.sphere(self.encoder(x, text_mask)), self.unit)


class VisionEncoder(nn.Module):
  def __init__(self, c):
    super().__init__()
    D = c['hidden_dim']
    self.dropout = c['dropout']
    self.feature = nn.Linear(c['region_feat_dim'], D)
    self.location = nn.Linear(7, D)
    self.LayerNorm = nn.LayerNorm(D, eps=c['layer_norm_eps'])
    self.encoder = BertEncoder(c, c['vision_layers'])
    self.sphere = nn.Linear(D, D)
    self.unit = c.get('hypersphere', True)

  def forward(self, feats, boxes, mask, place=True):
    x = self.feature(feats)
    if place:
      x = x + self.location(location_features(boxes))
    x = F.dropout(self.LayerNorm(x), self.dropout, self.training)
    return end_on_sphere(self.sphere(self.encoder(x, mask)), self.unit)


class SlotEmbeddings(nn.Module):
  """Text slots: position + type 0; region slots: location + type 1;
  LayerNorm. Hugging Face's BertEmbeddings without the word table."""

  def __init__(self, c):
    super().__init__()
    D = c['hidden_dim']
    self.dropout = c['dropout']
    self.position_embeddings = nn.Embedding(c['max_position'], D)
    self.token_type_embeddings = nn.Embedding(2, D)
    self.location = nn.Linear(7, D)
    self.LayerNorm = nn.LayerNorm(D, eps=c['layer_norm_eps'])

  def forward(self, text, regions, boxes):
    T = text.shape[1]
    typ = self.token_type_embeddings.weight
    text = text + self.position_embeddings.weight[:T][None] + typ[0]
    regions = regions + self.location(location_features(boxes)) + typ[1]
    x = self.LayerNorm(torch.cat([text, regions], 1))
    return F.dropout(x, self.dropout, self.training)


def _transform(c, D_in=None):
  t = nn.Module()
  t.dense = nn.Linear(D_in or c['hidden_dim'], c['hidden_dim'])
  t.LayerNorm = nn.LayerNorm(c['hidden_dim'], eps=c['layer_norm_eps'])
  return t


def _apply_transform(t, x):
  return t.LayerNorm(F.gelu(t.dense(x)))


class VocabHead(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.transform = _transform(c)
    self.bias = nn.Parameter(torch.zeros(c['vocab_size']))

  def forward(self, x, word_embeddings):
    return _apply_transform(self.transform, x) @ word_embeddings.T + self.bias


class TagHead(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.transform = _transform(c)
    self.classifier = nn.Linear(c['hidden_dim'], c['num_tags'])

  def forward(self, x):
    return self.classifier(_apply_transform(self.transform, x))


class PairingHead(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.text_proj = nn.Linear(c['hidden_dim'], c['hidden_dim'])
    self.region_proj = nn.Linear(c['hidden_dim'], c['hidden_dim'])

  def forward(self, queries, keys, key_mask, query_side, key_side):
    q = getattr(self, f'{query_side}_proj')(queries)
    k = getattr(self, f'{key_side}_proj')(keys)
    logits = torch.einsum('bkd,bld->bkl', q, k) / math.sqrt(q.shape[-1])
    return torch.where(key_mask[:, None, :] > 0, logits,
                       torch.full_like(logits, -1e9))


class ITMHead(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.pooler = nn.Linear(c['hidden_dim'], c['hidden_dim'])
    self.classifier = nn.Linear(c['hidden_dim'], 2)

  def forward(self, cls):
    return self.classifier(torch.tanh(self.pooler(cls)))


class ClsClassifier(nn.Module):
  """[CLS] (beside the score-pooled region slots with head_input
  'cls_and_regions'; concatenated over num_images) -> Dense(2D), GELU,
  LayerNorm, Dense(C)."""

  def __init__(self, c, num_classes, num_images=1):
    super().__init__()
    D = c['hidden_dim']
    self.num_images = num_images
    self.reads_regions = c.get('head_input', 'cls') == 'cls_and_regions'
    width = 2 * D if self.reads_regions else D
    if self.reads_regions:
      self.region_score = nn.Linear(D, 1)
    self.dense = nn.Linear(num_images * width, 2 * D)
    self.LayerNorm = nn.LayerNorm(2 * D, eps=c['layer_norm_eps'])
    self.classifier = nn.Linear(2 * D, num_classes)

  def forward(self, x, inputs):
    cls = x[:, 0]
    if self.reads_regions:
      regions = x[:, inputs['input_ids'].shape[1]:]
      score = self.region_score(regions)[..., 0]
      score = torch.where(inputs['region_mask'] > 0, score,
                          torch.full_like(score, -1e9))
      pooled = torch.einsum('br,brd->bd', torch.softmax(score, -1), regions)
      cls = torch.cat([cls, pooled], -1)
    cls = cls.reshape(-1, self.num_images * cls.shape[-1])
    return self.classifier(self.LayerNorm(F.gelu(self.dense(cls))))


class RegionScorer(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.transform = _transform(c)
    self.score = nn.Linear(c['hidden_dim'], 1)

  def forward(self, x, inputs):
    regions = x[:, inputs['input_ids'].shape[1]:]
    logits = self.score(_apply_transform(self.transform, regions))[..., 0]
    return torch.where(inputs['region_mask'] > 0, logits,
                       torch.full_like(logits, -1e9))


def swap_anchor_features(text, regions, anchor_text_pos, anchor_text_end,
                         anchor_region, anchor_action, mask_vector,
                         moved_text=None, moved_regions=None):
  """CMAP's hybrid sequences, as `cmal_jax.model.cmap.swap_anchor_features`:
  text [B, T, D], regions [B, R, D], anchors [B, K] -> (text, regions); the
  moved features from moved_text / moved_regions when given."""
  T = text.shape[1]
  pos, end = anchor_text_pos.long(), anchor_text_end.long()
  region = anchor_region.long()
  swap = (anchor_action == SWAP)[..., None]
  hidden = (anchor_action == SWAP) | (anchor_action == MASK)
  word = gather_slots(text if moved_text is None else moved_text, pos)
  obj = gather_slots(regions if moved_regions is None else moved_regions,
                     region)
  mask_vector = mask_vector.to(text.dtype)
  new_word_slot = torch.where(swap, obj, mask_vector)
  new_region_slot = torch.where(swap, word, mask_vector)
  t = torch.arange(T, device=text.device)[None, None]
  other_pieces = torch.any(hidden[..., None] & (t > pos[..., None])
                           & (t < end[..., None]), 1)
  text = torch.where(other_pieces[..., None], mask_vector, text)
  b, k = hidden.nonzero(as_tuple=True)  # Only hidden anchors move.
  text, regions = text.clone(), regions.clone()
  text[b, pos[b, k]] = new_word_slot[b, k]
  regions[b, region[b, k]] = new_region_slot[b, k]
  return text, regions


def image_feature(region_unit, region_mask):
  m = region_mask[..., None].to(region_unit.dtype)
  return l2_normalize(torch.sum(region_unit * m, 1)
                      / torch.clamp(torch.sum(m, 1), min=1.0))


class CMAL(nn.Module):
  """The whole model for `config['task']`: 'pretrain' or a task of
  cmal_jax.data.tasks.TASKS. `config` is the exported config.json's
  'model' section plus task and num_outputs."""

  def __init__(self, config):
    super().__init__()
    c = dict(config['model'])
    self.config, self.task = config, config['task']
    self.moved_place = config['model'].get('moved_place', 'carried')
    self.text_encoder = TextEncoder(c)
    self.vision_encoder = VisionEncoder(c)
    scale = math.sqrt(c['hidden_dim']) if c.get('hypersphere', True) else 1.0
    self.text_scale = nn.Parameter(torch.tensor(scale))
    self.vision_scale = nn.Parameter(torch.tensor(scale))
    self.mask_vector = nn.Parameter(torch.zeros(c['hidden_dim']))
    self.slots = SlotEmbeddings(c)
    self.unified = BertEncoder(c, c['unified_layers'])
    if self.task in ('pretrain', 'retrieval'):
      self.itm_head = ITMHead(c)
      self.itc_log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    if self.task == 'pretrain':
      self.vocab_head = VocabHead(c)
      self.tag_head = TagHead(c)
      self.pairing_head = PairingHead(c)
    elif self.task in ('vqa', 've', 'nlvr2'):
      classes = {'vqa': config.get('num_outputs', 0), 've': 3, 'nlvr2': 2}
      setattr(self, f'{self.task}_head', ClsClassifier(
          c, classes[self.task], num_images=2 if self.task == 'nlvr2' else 1))
    elif self.task == 'rec':
      self.rec_head = RegionScorer(c)
    elif self.task != 'retrieval':
      raise ValueError(f'unknown task {self.task!r} in the config')

  # ------------------------------------------------------------- loading

  @classmethod
  def from_pretrained(cls, directory, device='cpu'):
    """An exported folder (config.json + model.safetensors) -> the model in
    eval mode. Missing, unexpected or misshapen weights raise ValueError
    naming them."""
    from safetensors.torch import load_file
    with open(os.path.join(directory, CONFIG_FILE)) as f:
      config = json.load(f)
    model = cls(config)
    path = os.path.join(directory, WEIGHTS_FILE)
    state = load_file(path, device=device)
    own = model.state_dict()
    problems = [f'{k}: missing in {path}' for k in own if k not in state]
    problems += [f'{k}: unexpected in {path}' for k in state if k not in own]
    problems += [f'{k}: {path} {tuple(state[k].shape)}, model '
                 f'{tuple(own[k].shape)}' for k in own
                 if k in state and state[k].shape != own[k].shape]
    if problems:
      raise ValueError(f'{path} does not fit the model of {directory}/'
                       f'{CONFIG_FILE} ({len(problems)} problem(s)): '
                       + '; '.join(problems[:8]))
    model.load_state_dict(state)
    return model.to(device).eval()

  def jax_params(self):
    """The parameters in the JAX model's tree (numpy), through torch_names."""
    from cmal_jax.export import export  # JAX, only when asked.
    from cmal_jax.model import torch_names
    template = export.abstract_params(self.config)
    state = {k: v.detach().cpu().numpy() for k, v in self.state_dict().items()}
    return torch_names.from_torch_state(state, template, 'the PyTorch model')

  # ------------------------------------------------------------- forward

  def embed_text(self, inputs, place=True):
    return self.text_encoder(inputs['input_ids'], inputs['text_mask'], place)

  def embed_regions(self, inputs, place=True):
    return self.vision_encoder(inputs['region_feats'],
                               inputs['region_boxes'], inputs['region_mask'],
                               place)

  def hybrid_embeddings(self, text_unit, region_unit, inputs):
    """CMAP (when inputs carry anchor_action) and the slot embeddings: the
    unified encoder's input [B, T + R, D]. As the JAX model, the moved
    features come from a UMSE pass of inputs['moved'] without place when
    model.moved_place is 'none' (exports that predate it: 'carried')."""
    text, regions = (text_unit * self.text_scale,
                     region_unit * self.vision_scale)
    if 'anchor_action' in inputs:
      moved = (None, None)
      own_pass = self.moved_place == 'none'
      if own_pass or 'moved' in inputs:
        source = {**inputs, **inputs.get('moved', {})}
        moved = (self.embed_text(source, not own_pass) * self.text_scale,
                 self.embed_regions(source, not own_pass) * self.vision_scale)
      text, regions = swap_anchor_features(
          text, regions, inputs['anchor_text_pos'], inputs['anchor_text_end'],
          inputs['anchor_region'], inputs['anchor_action'], self.mask_vector,
          *moved)
    return self.slots(text, regions, inputs['region_boxes'])

  def forward(self, inputs):
    text_unit, region_unit = self.embed_text(inputs), self.embed_regions(inputs)
    mask = torch.cat([inputs['text_mask'], inputs['region_mask']], 1)
    x = self.unified(self.hybrid_embeddings(text_unit, region_unit, inputs),
                     mask)
    itc = lambda: {'itc_text': l2_normalize(text_unit[:, 0]),
                   'itc_image': image_feature(region_unit,
                                             inputs['region_mask']),
                   'itc_log_scale': self.itc_log_scale}
    if self.task == 'retrieval':
      return {'logits': self.itm_head(x[:, 0]), **itc()}
    if self.task != 'pretrain':
      return {'logits': getattr(self, f'{self.task}_head')(x, inputs)}
    T = inputs['input_ids'].shape[1]
    text_out, region_out = x[:, :T], x[:, T:]
    at_word = gather_slots(text_out, inputs['anchor_text_pos'])
    at_region = gather_slots(region_out, inputs['anchor_region'])
    K = at_word.shape[1]
    words = self.vocab_head(torch.cat(
        [at_word, gather_slots(text_out, inputs['mlm_positions'])], 1),
                            self.text_encoder.word_embeddings.weight)
    return {
        'amc_t2r_logits': self.pairing_head(
            at_word, region_out, inputs['region_mask'], 'text', 'region'),
        'amc_r2t_logits': self.pairing_head(
            at_region, text_out, inputs['text_mask'], 'region', 'text'),
        'amc_word_logits': words[:, :K],
        'amc_tag_logits': self.tag_head(at_region),
        'mlm_logits': words[:, K:],
        'mrc_logits': self.tag_head(region_out),
        'itm_logits': self.itm_head(x[:, 0]),
        **itc(),
    }
