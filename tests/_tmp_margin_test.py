import numpy as np
import test_finetune
from test_finetune import retrieval_setup  # noqa

def test_margins(retrieval_setup):
  scores, direct, sim = retrieval_setup
  print('row std (per caption over images)', sim.std(1).mean(), 'col std (per image over captions)', sim.std(0).mean())
  print(sim[:6, :4])
