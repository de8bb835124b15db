"""Tiny data sets in the real on-disk formats, for tests that must not need the real files.

- `write_idx(path, array)`: one IDX file (gzip-compressed when the name ends in .gz).
- `make_mnist_dir(path, n_train, n_test, seed)`: the four MNIST `*-ubyte.gz` archives.
- `make_lfw_dir(path, counts, size, seed)`: an LFW tree `<Person>/<Person>_NNNN.jpg`.
- `make_data_root(path, ...)`: both, laid out as the real data root (`mnist/`, `lfw/...`).

The images are learnable: each class has its own pattern (a bright square for an MNIST digit, a
colour and a bright square for an LFW person) plus noise, so a tiny model trained for a few steps
beats chance. Use them as `from fakedata import make_mnist_dir` (pytest puts tests/ on sys.path).
"""

import gzip
import pathlib
import types

import jax
import numpy as np
from PIL import Image

_IDX_CODES = {
  np.dtype("uint8"): 0x08,
  np.dtype("int8"): 0x09,
  np.dtype("int16"): 0x0B,
  np.dtype("int32"): 0x0C,
  np.dtype("float32"): 0x0D,
  np.dtype("float64"): 0x0E,
}
MNIST_STEMS = (
  "train-images-idx3-ubyte",
  "train-labels-idx1-ubyte",
  "t10k-images-idx3-ubyte",
  "t10k-labels-idx1-ubyte",
)


def idx_bytes(array) -> bytes:
  """The IDX encoding of `array`: magic (0, 0, type code, ndim), big-endian sizes and values."""
  array = np.asarray(array)
  code = _IDX_CODES[array.dtype.newbyteorder("=")]
  header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path, array) -> pathlib.Path:
  """Writes `array` as an IDX file at `path`, gzip-compressed if the name ends in .gz."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  data = idx_bytes(array)
  path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
  return path


def mnist_like(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """n uint8 [28, 28] images and labels 0..9 (every digit present when n >= 10)."""
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
  images = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
  for i, digit in enumerate(labels):
    row, col = 2 + 8 * (digit // 4), 2 + 8 * (digit % 4)  # a 3x4 grid of 8x8 squares
    images[i, row : row + 8, col : col + 8] = 255
  return images, labels


def make_mnist_dir(path, n_train: int = 100, n_test: int = 50, seed: int = 0) -> pathlib.Path:
  """Writes the four MNIST archives (gz IDX, the official names) into `path`; returns it."""
  path = pathlib.Path(path)
  train = mnist_like(n_train, seed)
  test = mnist_like(n_test, seed + 1)
  for stem, array in zip(MNIST_STEMS, (*train, *test), strict=True):
    write_idx(path / f"{stem}.gz", array)
  return path


def make_lfw_dir(path, counts: dict, size: int = 250, seed: int = 0) -> pathlib.Path:
  """Writes an LFW tree `path/<Person>/<Person>_NNNN.jpg` (RGB JPEGs, size x size); returns it.

  Args:
    path: the tree's root (e.g. `<root>/lfw/lfw-deepfunneled`).
    counts: person name -> number of images.
    size: the side of each square image (250 in real LFW).
    seed: the images' randomness.
  """
  path = pathlib.Path(path)
  rng = np.random.default_rng(seed)
  for p, (person, count) in enumerate(sorted(counts.items())):
    folder = path / person
    folder.mkdir(parents=True, exist_ok=True)
    colour = rng.integers(0, 256, 3)
    corner = (p * size // 7) % max(1, size // 2)
    for i in range(count):
      image = np.clip(colour + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
      image[corner : corner + size // 2, corner : corner + size // 2] = 255
      Image.fromarray(image).save(folder / f"{person}_{i + 1:04d}.jpg", quality=90)
  return path


def make_data_root(
  path,
  *,
  n_train: int = 100,
  n_test: int = 50,
  counts: dict | None = None,
  size: int = 250,
  seed: int = 0,
) -> pathlib.Path:
  """A data root as VAE_ATTACKS_DATA_DIR expects: `mnist/*.gz` and `lfw/lfw-deepfunneled/`."""
  path = pathlib.Path(path)
  make_mnist_dir(path / "mnist", n_train, n_test, seed)
  counts = {"Alice_Smith": 12, "Bob_Jones": 10, "Carol_White": 4} if counts is None else counts
  make_lfw_dir(path / "lfw" / "lfw-deepfunneled", counts, size, seed)
  return path


def toy_data(n_train=96, n_test=48, size=8, classes=3, seed=0):
  """Class k: a bright 3x3 block at corner k on faint noise; trivially separable."""
  rng = np.random.default_rng(seed)
  corners = [(0, 0), (0, size - 3), (size - 3, 0), (size - 3, size - 3)][:classes]

  def make(n):
    y = rng.integers(0, classes, n).astype(np.int32)
    x = 0.1 * rng.uniform(size=(n, size, size, 1)).astype(np.float32)
    for i, k in enumerate(y):
      r, c = corners[k]
      x[i, r : r + 3, c : c + 3, 0] = 1.0
    return x, y

  x_train, y_train = make(n_train)
  x_test, y_test = make(n_test)
  return types.SimpleNamespace(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


def numpy_init(module, *args):
  """Variables from numpy (module.init compiles threefry per shape: slow on a busy CPU)."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)
  rng = np.random.default_rng(0)
  return jax.tree.map(
    lambda s: (
      (rng.standard_normal(s.shape) / np.sqrt(max(s.shape[:-1] or (1,)))).astype(s.dtype)
      if len(s.shape) > 1
      else np.zeros(s.shape, s.dtype)
    ),
    shapes,
  )
