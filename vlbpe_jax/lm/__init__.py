"""Being-VL's unified LM: one decoder over text | special | VQ | BPE tokens.

- config.py: `LMConfig`, the variant table (`mu`, `S`, `B`, `1B`, `llama3_8b`), vocab layout.
- model.py: `LM` (Llama-style decoder; logits, hidden states, extra input embeddings, KV
  cache), `init_cache`. layers.py / attention.py: RMSNorm, RoPE (1D/2D), SwiGLU, GQA.
- generate.py: jitted batched KV-cache decoding (greedy, temperature, top-k, top-p, stops).
- stages.py: the 3 unfreezing stages as optax partitions; optimizer-state migration.
- hf.py: Hugging Face Llama/Qwen2/Qwen3 safetensors import/export, vocabulary extension.
"""
