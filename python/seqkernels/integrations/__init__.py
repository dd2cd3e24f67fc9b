"""Glue between seqkernels and other libraries. Each module imports its client lazily, so
``import seqkernels`` never needs them:

- :mod:`seqkernels.integrations.transformers`: seqkernels as the attention of Hugging Face
  transformers models (``pip install seqkernels[transformers]``).
"""
