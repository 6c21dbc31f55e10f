"""MLM + ITM alone, CMAP off: the baseline of both CMAL and CMCL (the base
pre-training config as it is)."""

TITLE = 'MLM + ITM'


def configure(config):
  del config  # The base config's objectives are this recipe's.
