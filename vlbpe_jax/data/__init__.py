"""Data: the embedded procedural shapes dataset, tokenizers and input pipelines."""
