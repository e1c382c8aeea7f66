"""Text ids for the CLIP text tower: `encode(text)` pieces, padded with 0 to a fixed length.

Convention: pad id 0 after the sequence, and the tower pools the state at the LAST NON-PAD token,
which should be the EOS. With the project's sentencepiece tokenizer (data/text_tokenizer.py:
unk=0, bos=1, eos=2, pad=3) pass `encode=lambda s: tok.encode(s, add_eos=True)`: its encoder
never emits id 0 (byte fallback, no unk), so 0 is free for padding (its own pad id 3 is unused
here). OpenAI's tokenizer pads with 0 too and its EOT (49407) is the largest id, so for those
ids "last non-pad" is exactly OpenAI's `argmax(ids)`; Hugging Face's CLIPTokenizer pads with the
EOT instead, so such rows must be re-padded with 0 after the first EOT (see hf.py).
"""

from collections.abc import Callable, Sequence

import numpy as np

PAD_ID = 0


def tokenize(texts: Sequence[str], encode: Callable[[str], list[int]], context_len: int):
  """texts -> int32 `[N, context_len]`, each row `encode(text)` then PAD_ID.

  Raises ValueError for an empty encoding, a row longer than `context_len` or an id equal to
  PAD_ID (it would be read as padding).
  """
  out = np.full((len(texts), context_len), PAD_ID, np.int32)
  for i, text in enumerate(texts):
    ids = list(encode(text))
    if not ids:
      raise ValueError(f"text {text!r} encodes to no ids; expected at least one (the EOS)")
    if len(ids) > context_len:
      raise ValueError(f"text {text!r} has {len(ids)} ids > context_len={context_len}")
    if PAD_ID in ids:
      raise ValueError(f"text {text!r} encodes to ids {ids} containing the pad id {PAD_ID}")
    out[i, :len(ids)] = ids
  return out
