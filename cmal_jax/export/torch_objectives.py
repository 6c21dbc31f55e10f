"""The pre-training losses of `cmal_jax.objectives.compute_losses` in
PyTorch, over the mirror's outputs, so CMAL's objectives can be trained and
benchmarked in PyTorch too. Inputs and targets come from
`objectives.prepare_inputs` (its corruption is not re-implemented here).

    out = model(inputs)                       # torch_model.CMAL, train mode
    loss, metrics = compute_losses(out, targets, config['loss'])
"""

import math

import torch
import torch.nn.functional as F


def weighted_xent(logits, labels, weights):
  """Mean cross-entropy and accuracy over weighted entries, as
  model.xent.weighted_xent: logits [..., C], labels [...], weights [...] ->
  (loss, acc, count)."""
  w = weights.float()
  labels = torch.clamp(labels.long(), min=0)  # Unweighted entries may be -1.
  ce = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(),
                       reduction='none').view(labels.shape)
  label_logit = torch.gather(logits.float(), -1, labels[..., None])[..., 0]
  correct = (label_logit >= torch.amax(logits.float(), -1)).float()
  n = torch.sum(w)
  denom = torch.clamp(n, min=1.0)
  return torch.sum(ce * w) / denom, torch.sum(correct * w) / denom, n


def itc_loss(text, image, log_scale, positive):
  """InfoNCE both ways over matched pairs, as objectives.itc_loss."""
  logits = torch.einsum('id,jd->ij', text, image).float()
  logits = logits * torch.exp(torch.clamp(log_scale, max=math.log(100.0)))
  pair_ok = positive[:, None] & positive[None, :]
  logits = torch.where(pair_ok, logits, torch.full_like(logits, -1e9))
  labels = torch.arange(text.shape[0], device=text.device)
  t2i = weighted_xent(logits, labels, positive)
  i2t = weighted_xent(logits.T, labels, positive)
  return (t2i[0] + i2t[0]) / 2, (t2i[1] + i2t[1]) / 2


def compute_losses(outputs, targets, loss_config):
  """Weighted sum of the enabled objectives -> (loss, metrics), with
  objectives.compute_losses' names. loss_config: the config's `loss`
  section (a dict or ConfigDict)."""
  lc = dict(loss_config)
  metrics, total = {}, 0.0

  def add(name, weight, loss):
    nonlocal total
    metrics[f'loss_{name}'] = loss
    total = total + weight * loss

  if lc['amc'] > 0:
    w = targets['amc_weights']
    if lc['amc_targets'] in ('pairing', 'both'):
      t2r, t2r_acc, n = weighted_xent(outputs['amc_t2r_logits'],
                                      targets['amc_region'], w)
      r2t, r2t_acc, _ = weighted_xent(outputs['amc_r2t_logits'],
                                      targets['amc_text_pos'], w)
      add('amc_pair', lc['amc'], (t2r + r2t) / 2)
      metrics.update(acc_amc_t2r=t2r_acc, acc_amc_r2t=r2t_acc,
                     acc_amc_pair=(t2r_acc + r2t_acc) / 2, amc_anchors=n)
    if lc['amc_targets'] in ('label', 'both'):
      word, word_acc, _ = weighted_xent(outputs['amc_word_logits'],
                                        targets['amc_word'], w)
      tag, tag_acc, _ = weighted_xent(outputs['amc_tag_logits'],
                                      targets['amc_tag'],
                                      targets['amc_tag_weights'])
      add('amc_label', lc['amc'], (word + tag) / 2)
      metrics.update(acc_amc_word=word_acc, acc_amc_tag=tag_acc)
  if lc['mlm'] > 0:
    loss, acc, _ = weighted_xent(outputs['mlm_logits'],
                                 targets['mlm_targets'],
                                 targets['mlm_weights'])
    add('mlm', lc['mlm'], loss)
    metrics['acc_mlm'] = acc
  if lc['itm'] > 0:
    loss, acc, _ = weighted_xent(outputs['itm_logits'], targets['itm_label'],
                                 torch.ones_like(targets['itm_label'],
                                                 dtype=torch.bool))
    add('itm', lc['itm'], loss)
    metrics['acc_itm'] = acc
  if lc['mrc'] > 0:
    positions = targets['mrc_positions'].long()[..., None].expand(
        -1, -1, outputs['mrc_logits'].shape[-1])
    logits = torch.gather(outputs['mrc_logits'], 1, positions)
    loss, acc, _ = weighted_xent(logits, targets['mrc_targets'],
                                 targets['mrc_weights'])
    add('mrc', lc['mrc'], loss)
    metrics['acc_mrc'] = acc
  if lc['itc'] > 0:
    loss, acc = itc_loss(outputs['itc_text'], outputs['itc_image'],
                         outputs['itc_log_scale'], targets['positive'])
    add('itc', lc['itc'], loss)
    metrics['acc_itc'] = acc
  metrics['loss'] = total
  return total, metrics
