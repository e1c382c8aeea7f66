"""Two-tone product tokenizer: each p x p patch is a look (two colours) times a form (which of
its pixels take which colour), each quantised with its own codebook.

  tok = TwoTone.fit(train_images, patch=4, num_looks=64, num_forms=256)
  looks, forms = tok.encode(images)          # int32 [B, H/p, W/p] each
  ids = tok.product_ids(looks, forms)        # look * num_forms + form
  images_hat = tok.decode(looks, forms)      # uint8 [B, H, W, 3]

This is block truncation coding (Delp and Mitchell, 1979: a block as a bitmap and two levels)
in colour, with both parts vector-quantised. A patch is split along its principal colour
axis at its mean; its form is that bitmap, oriented so that its minority side is 1 (the side
of pixel 0 is 0 on a tie), and its look is the mean colour of each side (first the 1 side).
Nothing in a form depends on the colours: a star's edge gets the same form in red as in blue,
which is what an embedding that shares form across colours needs (BENCHMARKS.md, "Colour
apart from form" and "A two-tone tokenizer learnt from pixels"); a VQ whose codes read whole
patches ties form to colour.

Codebooks: the `num_forms` most frequent bitmaps of the training patches (a bitmap outside
them: the nearest by Hamming distance), and `num_looks` k-means centres of the training looks.
On images with at most two flat colours per patch, a bitmap and look in the codebooks decode
exactly. Pure numpy; codebooks save to and load from one `.npz`.
"""

import dataclasses

import numpy as np

_FLAT = 0.5  # a patch whose pixels all lie within this of its mean colour on the axis is flat
_CHUNK = 1 << 14  # patches per distance block


def _check_images(images, patch):
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images of shape {images.shape}: expected [B, H, W, 3]")
  if images.dtype != np.uint8:
    raise ValueError(f"images of dtype {images.dtype}: expected uint8 in [0, 255]")
  if images.shape[1] % patch or images.shape[2] % patch:
    raise ValueError(f"images of {images.shape[1]}x{images.shape[2]} px: expected multiples "
                     f"of patch={patch}")
  return images


def patches(images, patch):
  """uint8 `[B, H, W, 3]` -> float64 `[B, H/p, W/p, p*p, 3]`, each patch's pixels row-major."""
  b, h, w, _ = images.shape
  x = images.astype(np.float64).reshape(b, h // patch, patch, w // patch, patch, 3)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // patch, w // patch, patch * patch, 3)


def split_patches(x):
  """Patches `[..., P, 3]` -> (looks `[..., 6]`: the 1 side's mean colour then the 0 side's;
  forms `[..., P]` bool): the split along the principal colour axis at the mean, minority side
  1 (pixel 0's side 0 on a tie); a flat patch: all 0, both colours its mean."""
  shape, p = x.shape[:-2], x.shape[-2]
  x = x.reshape(-1, p, 3)
  mean = x.mean(1)  # [M, 3]
  centred = x - mean[:, None]
  _, vectors = np.linalg.eigh(np.einsum("mpi,mpj->mij", centred, centred))
  s = np.einsum("mpi,mi->mp", centred, vectors[..., -1])  # [M, P] along the principal axis
  form = (s > 0) & (np.abs(s).max(1, keepdims=True) > _FLAT)
  count = form.sum(1)
  flip = (2 * count > p) | ((2 * count == p) & form[:, 0])
  form ^= flip[:, None]
  count = form.sum(1, keepdims=True)
  one = np.where(count > 0, (x * form[..., None]).sum(1) / np.maximum(count, 1), mean)
  zero = np.where(count < p, (x * ~form[..., None]).sum(1) / np.maximum(p - count, 1), mean)
  return (np.concatenate([one, zero], -1).reshape(*shape, 6),
          form.reshape(*shape, p))


def nearest(points, centres, distance):
  """Index `[M]` of each point's nearest centre by `distance(points_block, centres)`
  `[m, K]`, in blocks of `_CHUNK` points (first index on ties)."""
  out = np.empty(len(points), np.int32)
  for i in range(0, len(points), _CHUNK):
    out[i:i + _CHUNK] = distance(points[i:i + _CHUNK], centres).argmin(1)
  return out


def _squared(a, b):
  return (a * a).sum(1)[:, None] - 2.0 * a @ b.T + (b * b).sum(1)[None]


def _hamming(a, b):
  return (a[:, None, :] != b[None]).sum(-1)


def kmeans(points, weights, k, *, iterations=25, seed=0):
  """Weighted k-means (k-means++ seeding, Lloyd steps) of `points [N, D]` -> centres
  `[min(k, N), D]`; with at most k distinct points, the points themselves."""
  if len(points) <= k:
    return points.copy()
  rng = np.random.default_rng(seed)
  centres = [points[rng.choice(len(points), p=weights / weights.sum())]]
  dist = _squared(points, np.array(centres))[:, 0]
  for _ in range(k - 1):
    p = weights * np.maximum(dist, 0.0)
    centres.append(points[rng.choice(len(points), p=p / p.sum())])
    dist = np.minimum(dist, _squared(points, centres[-1][None])[:, 0])
  centres = np.array(centres)
  for _ in range(iterations):
    assign = nearest(points, centres, _squared)
    mass = np.bincount(assign, weights, minlength=k)
    sums = np.stack([np.bincount(assign, weights * points[:, j], minlength=k)
                     for j in range(points.shape[1])], 1)
    moved = np.where(mass[:, None] > 0, sums / np.maximum(mass, 1e-12)[:, None], centres)
    if np.allclose(moved, centres):
      break
    centres = moved
  return centres


@dataclasses.dataclass(frozen=True)
class TwoTone:
  """Codebooks: `looks` float32 `[L, 6]` (RGB of the 1 side, then of the 0 side), `forms` bool
  `[F, patch * patch]`, most frequent first."""
  looks: np.ndarray
  forms: np.ndarray
  patch: int

  def __post_init__(self):
    looks, forms = np.asarray(self.looks), np.asarray(self.forms)
    if int(self.patch) < 1 or looks.ndim != 2 or looks.shape[1] != 6 or not len(looks) or (
        forms.ndim != 2 or forms.shape[1] != int(self.patch) ** 2 or not len(forms)):
      raise ValueError(f"looks of shape {looks.shape}, forms of shape {forms.shape}, patch="
                       f"{self.patch}: expected looks [L, 6] and forms [F, patch * patch], "
                       "L, F, patch >= 1")
    if forms.dtype != bool and not np.isin(forms, (0, 1)).all():
      raise ValueError(f"forms of dtype {forms.dtype} with values other than 0 and 1: expected "
                       "bitmaps")
    object.__setattr__(self, "looks", looks.astype(np.float32))
    object.__setattr__(self, "forms", forms.astype(bool))
    object.__setattr__(self, "patch", int(self.patch))

  @property
  def num_looks(self) -> int:
    return len(self.looks)

  @property
  def num_forms(self) -> int:
    return len(self.forms)

  @classmethod
  def fit(cls, images, *, patch=4, num_looks=64, num_forms=256, seed=0):
    """Codebooks from uint8 `images [B, H, W, 3]`."""
    if patch < 1 or num_looks < 1 or num_forms < 1:
      raise ValueError(f"patch={patch}, num_looks={num_looks}, num_forms={num_forms}: expected "
                       "each >= 1")
    images = _check_images(images, patch)
    looks, forms = split_patches(patches(images, patch))
    forms, counts = np.unique(forms.reshape(-1, patch * patch), axis=0, return_counts=True)
    forms = forms[np.argsort(-counts, kind="stable")[:num_forms]]
    looks, counts = np.unique(looks.reshape(-1, 6), axis=0, return_counts=True)
    looks = kmeans(looks, counts.astype(np.float64), num_looks, seed=seed)
    return cls(looks, forms, patch)

  def encode(self, images):
    """uint8 `[B, H, W, 3]` -> (looks, forms): int32 `[B, H/p, W/p]` each."""
    images = _check_images(images, self.patch)
    looks, forms = split_patches(patches(images, self.patch))
    grid = looks.shape[:-1]
    look_ids = nearest(looks.reshape(-1, 6), self.looks.astype(np.float64), _squared)
    form_ids = nearest(forms.reshape(-1, self.patch ** 2), self.forms, _hamming)
    return look_ids.reshape(grid), form_ids.reshape(grid)

  def _check_ids(self, looks, forms):
    looks, forms = np.asarray(looks), np.asarray(forms)
    if looks.shape != forms.shape:
      raise ValueError(f"looks of shape {looks.shape}, forms of shape {forms.shape}: expected "
                       "the same shape")
    for name, ids, n in (("look", looks, self.num_looks), ("form", forms, self.num_forms)):
      if ids.size and (ids.min() < 0 or ids.max() >= n):
        raise ValueError(f"{name} ids in [{ids.min()}, {ids.max()}]: expected [0, {n})")
    return looks, forms

  def decode(self, looks, forms):
    """int `[B, h, w]` each -> uint8 `[B, h*p, w*p, 3]`."""
    looks, forms = self._check_ids(looks, forms)
    b, h, w = looks.shape
    p = self.patch
    colours = np.round(self.looks[looks]).clip(0, 255).astype(np.uint8)  # [B, h, w, 6]
    x = np.where(self.forms[forms][..., None], colours[..., None, :3], colours[..., None, 3:])
    return x.reshape(b, h, w, p, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * p, w * p, 3)

  def product_ids(self, looks, forms):
    """One id per patch: `look * num_forms + form`, in [0, num_looks * num_forms)."""
    looks, forms = self._check_ids(looks, forms)
    return (looks.astype(np.int32) * self.num_forms + forms).astype(np.int32)

  def save(self, path):
    np.savez(path, looks=self.looks, forms=self.forms, patch=self.patch)

  @classmethod
  def load(cls, path):
    with np.load(path) as f:
      missing = {"looks", "forms", "patch"} - set(f.files)
      if missing:
        raise ValueError(f"{path}: no {sorted(missing)}; expected a file written by "
                         "TwoTone.save")
      return cls(f["looks"], f["forms"], int(f["patch"]))
