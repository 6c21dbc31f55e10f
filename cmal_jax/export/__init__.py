"""Interop with PyTorch and Hugging Face: `mapping` (the one name table),
`export` (python -m cmal_jax.export), `bert` (--config.init.bert and the
unified encoder as a BERT folder), `torch_model` (the PyTorch mirror; the
only module here that imports torch)."""
