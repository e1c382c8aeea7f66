"""Few-shot prompts for a frozen LM, as token ids: classification, captioning, VQA, restoration.

  support = [(global_ids_a, "circle"), (global_ids_b, "star")]   # per image: LM ids
  ids = classification_prompt(tok, support, query_ids, ["circle", "star"])   # list[int]
  labels = label_ids(tok, ["circle", "star"])                 # what constrained decoding emits

Layout (the V2L public code's classification prompt), one string per part:
  "For each of the following input output pairs, output is one of ['circle' or 'star']"
  "\\n###\\nInput:" "<" IMAGE ">\\nOutput:" "circle"   ... one block per support example
  "\\n###\\nInput:" "<" IMAGE ">\\nOutput:"                the query, last
Text parts are encoded one by one (`tok.encode`, whose dummy prefix stands for the space that
joins parts); image parts are raw LM ids (a global entry as its 1-3 subword ids, local tokens
as ids), never re-tokenised text (the public code decodes global entries to text and encodes
the string again; the paper and we feed the ids). Because sentencepiece splits at spaces, a
text-only prompt (inputs given as str) has exactly the ids of `tok.encode(prompt_text(...))`,
the layout of the stage-0 in-context episodes (data/icl.py). Prompts start with bos.
The public code also lists the query with its label among the examples; we do not.
"""

import numpy as np

INSTRUCTION = "For each of the following input output pairs, output is one of"
EXAMPLE_IN = "\n###\nInput:"
EXAMPLE_OUT = ">\nOutput:"
RESTORE_INSTRUCTION = "Learn a new language and predict the {m} tokens following the examples."


def class_list(classes) -> str:
  """`['a' or 'b' or 'c']`, the public code's spelling of the label set."""
  return "[" + " or ".join(f"'{c}'" for c in classes) + "]"


def image_part(x, vocab_size: int | None = None):
  """An input: str (text-only prompt, kept as text) or LM ids, flat `[n]` or nested (global
  entries as id lists) -> list[int]. Raises ValueError when empty or an id is out of range."""
  if isinstance(x, str):
    if not x.strip():
      raise ValueError(f"input={x!r}: expected a non-empty string")
    return x
  ids = [int(i) for e in x for i in np.ravel(e)]  # flat ids, id lists or a [k, 2] array
  if not ids:
    raise ValueError(f"input={x!r}: expected at least one token id")
  if min(ids) < 0 or (vocab_size is not None and max(ids) >= vocab_size):
    raise ValueError(f"input ids in [{min(ids)}, {max(ids)}]: expected ids in [0, {vocab_size})")
  return ids


def _check_classes(classes):
  classes = list(classes)
  if not classes or any(not isinstance(c, str) or not c.strip() or c != c.strip()
                        for c in classes) or len(set(classes)) != len(classes):
    raise ValueError(f"classes={classes!r}: expected distinct non-empty strings without "
                     "surrounding spaces")
  return classes


def classification_parts(support, query, classes, *, answer=None, instruction=True,
                         vocab_size=None) -> list:
  """The prompt as parts (str or list of ids); `answer` appends the query's label."""
  classes = _check_classes(classes)
  if not support:
    raise ValueError("support: expected at least one (input, label) example")
  parts = [f"{INSTRUCTION} {class_list(classes)}"] if instruction else []
  for x, label in list(support) + [(query, answer)]:
    if label is not None and label not in classes:
      raise ValueError(f"label={label!r}: expected one of {classes}")
    parts += [EXAMPLE_IN, "<", image_part(x, vocab_size), EXAMPLE_OUT]
    parts += [label] if label is not None else []
  return parts


def caption_parts(support, query, *, answer=None, instruction=None, vocab_size=None) -> list:
  """Captioning: "Input: < IMAGE >\\nOutput: caption" per example (the paper's `Input: Tg,
  output: caption`); generation should stop at the first "."."""
  if not support:
    raise ValueError("support: expected at least one (input, caption) example")
  parts = [instruction] if instruction else []
  for x, caption in list(support) + [(query, answer)]:
    parts += [EXAMPLE_IN, "<", image_part(x, vocab_size), EXAMPLE_OUT]
    parts += [_text("caption", caption)] if caption is not None else []
  return parts


def vqa_parts(support, query, question, *, answer=None, vocab_size=None) -> list:
  """VQA (the paper's `Condition: Tg. Question: Q. Answer: A`): support = [(input, question,
  answer)], then the query image and question, ending with "Answer:"."""
  parts = []
  for x, q, a in list(support) + [(query, question, answer)]:
    parts += ["\n###\nCondition:", "<", image_part(x, vocab_size), ">", "Question:",
              _text("question", q), "Answer:"]
    parts += [_text("answer", a)] if a is not None else []
  return parts


def restoration_parts(examples, query, vocab_size=None) -> list:
  """The public code's restoration prompt: the instruction, then "Input: < x >\\nOutput: y"
  per example (x: n ids, y: m ids, raw), then "Input: < query >\\nOutput:"."""
  if not examples:
    raise ValueError("examples: expected at least one (input ids, output ids) pair")
  m = {len(image_part(y)) for _, y in examples}
  if len(m) != 1:
    raise ValueError(f"example outputs have lengths {sorted(m)}: expected one length m")
  parts = [RESTORE_INSTRUCTION.format(m=m.pop())]
  for x, y in list(examples) + [(query, None)]:
    parts += [EXAMPLE_IN, "<", image_part(x, vocab_size), EXAMPLE_OUT]
    parts += [image_part(y, vocab_size)] if y is not None else []
  return parts


def _text(name, s):
  if not isinstance(s, str) or not s.strip():
    raise ValueError(f"{name}={s!r}: expected a non-empty string")
  return s.strip()


def encode_parts(tok, parts, *, bos=True) -> list[int]:
  """Parts -> ids: each str encoded alone, id lists as they are; bos first."""
  ids = [tok.bos_id] if bos else []
  for p in parts:
    ids += tok.encode(p) if isinstance(p, str) else list(p)
  return ids


def prompt_text(parts) -> str:
  """The text of all-str parts joined by single spaces (encodes to `encode_parts`' ids)."""
  if any(not isinstance(p, str) for p in parts):
    raise ValueError("parts hold token ids: only a text-only prompt has a text")
  return " ".join(parts)


def classification_prompt(tok, support, query_tokens, classes, *, instruction=True):
  """support: [(input, label)] with input = LM ids (see `image_part`) or str; -> list[int]."""
  return encode_parts(tok, classification_parts(
      support, query_tokens, classes, instruction=instruction, vocab_size=tok.vocab_size))


def caption_prompt(tok, support, query_tokens, *, instruction=None):
  return encode_parts(tok, caption_parts(support, query_tokens, instruction=instruction,
                                         vocab_size=tok.vocab_size))


def vqa_prompt(tok, support, query_tokens, question):
  return encode_parts(tok, vqa_parts(support, query_tokens, question,
                                     vocab_size=tok.vocab_size))


def restoration_prompt(tok, examples, query):
  """examples: ~10 pairs (input ids [n], output ids [m]); query: ids [n] -> list[int]."""
  return encode_parts(tok, restoration_parts(examples, query, vocab_size=tok.vocab_size))


def label_ids(tok, classes) -> dict[str, list[int]]:
  """Each class's ids as they follow "Output:" in a prompt (for constrained decoding)."""
  return {c: tok.encode(c) for c in _check_classes(classes)}


def end_id(tok) -> int:
  """The id that follows a label in the prompt (first id of the next example's header)."""
  return tok.encode(EXAMPLE_IN)[0]
