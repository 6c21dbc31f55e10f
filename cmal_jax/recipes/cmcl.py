"""CMCL: contrastive alignment (ITC) in place of CMAP and AMC, beside MLM
and ITM: the contrastive baseline CMAL is compared with."""

TITLE = 'CMCL'


def configure(config):
  config.loss.itc = 1.0
