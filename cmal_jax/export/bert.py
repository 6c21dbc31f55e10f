"""Our unified encoder written as a Hugging Face BERT folder (the other
direction, initialising from one, is cmal_jax/model/bert_init.py). Names go
through `torch_names.BERT_NAMES`, the table both directions share.
"""

from cmal_jax.model import torch_names


def bert_config(model_config):
  """A Hugging Face BertConfig dict for our unified encoder."""
  m = model_config
  return dict(
      architectures=['BertModel'], model_type='bert',
      vocab_size=m['vocab_size'], hidden_size=m['hidden_dim'],
      num_hidden_layers=m['unified_layers'],
      num_attention_heads=m['num_heads'], intermediate_size=m['mlp_dim'],
      hidden_act='gelu', hidden_dropout_prob=m['dropout'],
      attention_probs_dropout_prob=m['dropout'],
      max_position_embeddings=m['max_position'], type_vocab_size=2,
      initializer_range=0.02, layer_norm_eps=m['layer_norm_eps'],
      pad_token_id=0, position_embedding_type='absolute')


def unified_bert_state(torch_state):
  """Our PyTorch-mirror state -> the unified encoder's BertModel state."""
  return torch_names.rename_prefixes(torch_state, torch_names.BERT_NAMES)
