"""CMAL (the paper): CMAP swaps anchor words and their regions between the
two sequences; AMC recovers the pairs and labels, beside MLM and ITM."""

TITLE = 'CMAL'


def configure(config):
  config.cmap.enabled = True
  config.loss.amc = 1.0
  config.eval.best_metric = 'amc_pair_acc'
