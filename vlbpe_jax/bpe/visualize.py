"""Token activation maps: every cell coloured by the BPE token that covers it.

  bpe = VisualBPE.load("bpe.json")
  pic = token_map_figure(bpe, codes[:8], images=rgb[:8])   # uint8 [rows, cols, 3]
  save_png(pic, "token_map.png")

Colours come from the token id (a fixed hash to hue), so the same token has the same colour in
every image; single base codes are drawn grey, and token borders are darkened.
"""

import colorsys

import numpy as np
from PIL import Image


def token_colours(ids: np.ndarray, base_vocab_size: int) -> np.ndarray:
  """uint8 [..., 3]: merged tokens get a hue from a golden-ratio hash of their id."""
  ids = np.asarray(ids, np.int64)
  hue = ((ids * 0.6180339887) % 1.0).reshape(-1)
  rgb = np.array([colorsys.hsv_to_rgb(h, 0.65, 0.95) for h in hue]).reshape(ids.shape + (3,))
  rgb[ids < base_vocab_size] = 0.55
  return (rgb * 255).round().astype(np.uint8)


def token_maps(bpe, grids: np.ndarray, scale: int = 8) -> np.ndarray:
  """uint8 [N, H*scale, W*scale, 3]: each cell coloured by its covering token."""
  if scale < 2:
    raise ValueError(f"scale={scale}: expected >= 2 (one pixel is the token border)")
  state = bpe.tokenize(grids)
  n, h, w = state.n, state.h, state.w
  owner = state.owners(np.arange(n * h * w)).reshape(n, h, w)
  cell_tok = state.tok[owner]  # token covering each cell  [N, H, W]
  pic = token_colours(cell_tok, bpe.base_vocab_size)
  pic = np.repeat(np.repeat(pic, scale, axis=1), scale, axis=2)  # [N, H*s, W*s, 3]
  edge_x = np.zeros((n, h, w), bool)
  edge_x[:, :, 1:] = owner[:, :, 1:] != owner[:, :, :-1]
  edge_y = np.zeros((n, h, w), bool)
  edge_y[:, 1:, :] = owner[:, 1:, :] != owner[:, :-1, :]
  ex = np.repeat(np.repeat(edge_x, scale, 1), scale, 2)
  ey = np.repeat(np.repeat(edge_y, scale, 1), scale, 2)
  first_col = (np.arange(w * scale) % scale == 0)[None, None, :]
  first_row = (np.arange(h * scale) % scale == 0)[None, :, None]
  border = (ex & first_col) | (ey & first_row)
  pic[border] = (pic[border] * 0.35).astype(np.uint8)
  return pic


def token_map_figure(bpe, grids: np.ndarray, images=None, scale: int = 8,
                     pad: int = 4) -> np.ndarray:
  """One uint8 picture: a row per grid with [image | token map] (or the map alone)."""
  maps = token_maps(bpe, grids, scale)
  n, mh, mw, _ = maps.shape
  rows = []
  for i in range(n):
    tiles = [maps[i]]
    if images is not None:
      img = Image.fromarray(np.asarray(images[i], np.uint8)).resize((mw, mh), Image.NEAREST)
      tiles.insert(0, np.asarray(img.convert("RGB")))
    gap = np.full((mh, pad, 3), 255, np.uint8)
    row = np.concatenate(sum([[t, gap] for t in tiles], [])[:-1], axis=1)
    rows += [row, np.full((pad, row.shape[1], 3), 255, np.uint8)]
  return np.concatenate(rows[:-1], axis=0)


def save_png(picture: np.ndarray, path: str):
  """Saves a uint8 [H, W, 3] picture as PNG."""
  picture = np.asarray(picture)
  if picture.dtype != np.uint8 or picture.ndim != 3 or picture.shape[-1] != 3:
    raise ValueError(f"picture {picture.dtype} {picture.shape}: expected uint8 [H, W, 3]")
  Image.fromarray(picture).save(path)
