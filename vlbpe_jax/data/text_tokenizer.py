"""sentencepiece text tokenizer with reserved control tokens, trained here or loaded.

  tok = TextTokenizer.train(texts, vocab_size=512, model_path=f"{workdir}/text.model")
  tok = TextTokenizer.load("llama/tokenizer.model")     # same interface
  ids = tok.encode("a red circle", add_bos=True)       # list[int]
  tok.decode(ids) == "a red circle"

Special tokens (`SPECIAL_PIECES`): bos `<s>`, eos `</s>`, pad `<pad>`, image begin/end
`<img>` `</img>`, roles `<user>` `<assistant>`. They are sentencepiece CONTROL pieces, which the
encoder never emits for text: the string "<img>" or "</s>" in user text is spelled with ordinary
pieces (or byte pieces), so it cannot forge a control id; `decode` drops control ids.

Models we train: unk=0, bos=1, eos=2, pad=3, then `<img> </img> <user> <assistant>` = 4..7, byte
fallback (every UTF-8 string round-trips), identity normalisation (spaces are kept).
Loaded models (e.g. a Llama `tokenizer.model`) keep their own bos/eos/pad/unk ids; each special
piece the model lacks is appended as a CONTROL piece after the model's vocab, in the order of
`SPECIAL_PIECES` (Llama-2, 32000 pieces: `<pad>`=32000, `<img>`=32001, `</img>`=32002,
`<user>`=32003, `<assistant>`=32004), so `vocab_size` grows by that many. A model that has one of
these spellings as an ordinary (text-reachable) piece is refused with a ValueError. `save` writes
the extended model, which then loads with the same ids.
"""

import io
import os

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from vlbpe_jax import fileio

# Role name -> piece spelling, in id order for trained models (after unk=0).
SPECIAL_PIECES = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "image_begin": "<img>",
                  "image_end": "</img>", "user": "<user>", "assistant": "<assistant>"}
_CONTROL = sp_pb2.ModelProto.SentencePiece.CONTROL
_MODEL_TYPES = ("unigram", "bpe")


class TextTokenizer:
  """A sentencepiece model plus the ids of the special tokens; picklable (grain workers)."""

  def __init__(self, model_proto: bytes):
    proto = sp_pb2.ModelProto.FromString(model_proto)
    spec, ids = proto.trainer_spec, {}
    own = {"bos": spec.bos_id, "eos": spec.eos_id, "pad": spec.pad_id}
    by_piece = {p.piece: i for i, p in enumerate(proto.pieces)}
    for role, piece in SPECIAL_PIECES.items():
      if own.get(role, -1) >= 0:
        ids[role] = own[role]
      elif piece in by_piece:
        if proto.pieces[by_piece[piece]].type != _CONTROL:
          raise ValueError(f"model piece {piece!r} (id {by_piece[piece]}) is an ordinary piece "
                           f"that plain text can produce; expected a CONTROL piece or none")
        ids[role] = by_piece[piece]
      else:  # Append after the model's vocab.
        proto.pieces.add(piece=piece, score=0.0, type=_CONTROL)
        ids[role] = by_piece[piece] = len(proto.pieces) - 1
    self._proto = proto.SerializeToString()
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    self._ids = ids

  @classmethod
  def load(cls, path) -> "TextTokenizer":
    """Loads a sentencepiece `.model` file (ours or any other, e.g. Llama's)."""
    if not os.path.isfile(path):
      raise ValueError(f"path={str(path)!r}: no such sentencepiece model file")
    with open(path, "rb") as f:
      data = f.read()
    try:
      proto = sp_pb2.ModelProto.FromString(data)
      # Cut at a field boundary, a torn file still parses, without the specs after the pieces.
      if not (proto.HasField("trainer_spec") and proto.HasField("normalizer_spec")):
        raise ValueError("no trainer_spec or normalizer_spec")
    except Exception as e:  # protobuf's DecodeError (or the above): a torn or foreign file
      raise fileio.CorruptArtifactError(
          f"sentencepiece model {path} cannot be parsed ({e}): the file is truncated or not a "
          "sentencepiece .model; delete it and rerun the data stage") from e
    return cls(data)

  @classmethod
  def train(cls, texts, *, vocab_size: int, model_path, model_type: str = "unigram",
            seed: int = 0, hard_vocab_limit: bool = False) -> "TextTokenizer":
    """Trains on an iterable of strings, writes `model_path` (a `.model` file) and loads it.

    Deterministic: one thread, all sentences, no input shuffling, seeded. `vocab_size` is an
    upper bound unless `hard_vocab_limit` (small corpora yield fewer pieces; a unigram model
    with a hard limit needs roughly 30 KB of text for 512 pieces).
    """
    if model_type not in _MODEL_TYPES:
      raise ValueError(f"model_type={model_type!r}: expected one of {_MODEL_TYPES}")
    if vocab_size < 256 + len(SPECIAL_PIECES) + 2:
      raise ValueError(f"vocab_size={vocab_size}: expected >= {256 + len(SPECIAL_PIECES) + 2} "
                       "(256 byte-fallback pieces, the special pieces and some text)")
    texts = [t for t in texts if t]
    if not texts:
      raise ValueError("texts: expected at least one non-empty string")
    buf = io.BytesIO()
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size,
        model_type=model_type, unk_id=0, bos_id=1, eos_id=2, pad_id=3, pad_piece="<pad>",
        control_symbols=[SPECIAL_PIECES[k] for k in ("image_begin", "image_end", "user",
                                                     "assistant")],
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        hard_vocab_limit=hard_vocab_limit, num_threads=1, input_sentence_size=0,
        shuffle_input_sentence=False, max_sentence_length=1 << 16, minloglevel=2)
    tok = cls(buf.getvalue())
    tok.save(model_path)
    return tok

  def save(self, model_path) -> None:
    """Writes the (possibly extended) model; `load` of it gives the same ids."""
    fileio.write_bytes(model_path, self._proto)  # atomic: a crash never leaves half a model

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    if not isinstance(text, str):
      raise ValueError(f"text={text!r}: expected a str")
    ids = self._sp.encode(text)
    return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

  def decode(self, ids) -> str:
    """Text of `ids`; control tokens (bos, eos, image, roles, pad) decode to nothing."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"ids contain {bad[:5]}: expected ids in [0, {self.vocab_size})")
    return self._sp.decode(ids)

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def piece_type(self, i: int) -> str:
    """The sentencepiece type of id `i`: "control", "unknown", "byte", "unused" or "normal"
    (user-defined pieces count as normal: plain text can produce them)."""
    i = int(i)
    if not 0 <= i < self.vocab_size:
      raise ValueError(f"id={i}: expected an id in [0, {self.vocab_size})")
    for kind, test in (("control", self._sp.is_control), ("unknown", self._sp.is_unknown),
                       ("byte", self._sp.is_byte), ("unused", self._sp.is_unused)):
      if test(i):
        return kind
    return "normal"

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def special_ids(self) -> dict[str, int]:
    return dict(self._ids)

  bos_id = property(lambda self: self._ids["bos"])
  eos_id = property(lambda self: self._ids["eos"])
  pad_id = property(lambda self: self._ids["pad"])
  image_begin_id = property(lambda self: self._ids["image_begin"])
  image_end_id = property(lambda self: self._ids["image_end"])
  user_id = property(lambda self: self._ids["user"])
  assistant_id = property(lambda self: self._ids["assistant"])

  def __getstate__(self):
    return {"model_proto": self._proto}

  def __setstate__(self, state):
    self.__init__(state["model_proto"])


def example_texts(example) -> list[str]:
  """All texts of one example (shapes dict or decoded record): the tokenizer's training text."""
  out = []
  for key in ("caption", "captions", "attributes"):
    value = example.get(key)
    out.extend([value] if isinstance(value, str) else list(value or []))
  for qa in example.get("qa") or []:
    out += [qa["q"], qa["a"]]
  for turn in list(example.get("dialogue") or []) + list(example.get("conversations") or []):
    out.append(turn["value"])
  return [t for t in dict.fromkeys(out) if t]


def train_on_shapes(model_path, *, num_examples: int, vocab_size: int, seed: int = 0,
                    split: str = "train", model_type: str = "unigram") -> TextTokenizer:
  """Trains on the texts of shapes examples 0..num_examples-1 of `split` (the demo's model)."""
  from vlbpe_jax.data import shapes  # pylint: disable=g-import-not-at-top
  texts = []
  for i in range(num_examples):
    texts += example_texts(shapes.make_example(i, split, seed=seed, resolution=32))
  return TextTokenizer.train(texts, vocab_size=vocab_size, model_path=model_path,
                             model_type=model_type, seed=seed)
