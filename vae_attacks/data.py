"""MNIST and LFW as numpy arrays, from local original files or from TFDS.

The only module of the library that touches TensorFlow / TFDS, and only on the TFDS path: the
local path reads the original files with numpy (MNIST's IDX archives) and PIL (LFW's JPEGs).

Data sets:
- MNIST (LeCun, Bottou, Bengio, Haffner 1998): 60,000 / 10,000 grey 28x28 digits, the official
  split and order; class names '0'..'9'.
- LFW, Labeled Faces in the Wild (Huang, Ramesh, Berg, Learned-Miller 2007), as a face
  identification task (as in scikit-learn's `fetch_lfw_people`): the people with at least
  `min_faces_per_person` images (70 -> 7 people, 1,288 images), class names sorted, a
  deterministic split stratified per person, each 250x250 JPEG centre-cropped to `crop_size` and
  (optionally) downscaled to `image_size` with box (area) resampling; colour, C = 3.

Where the data come from (`cfg.source`):
- 'local': a folder of the original files: `cfg.dir`, else the environment variable
  VAE_ATTACKS_DATA_DIR. It may be a data root holding `mnist/` and `lfw/`, or the specific folder:
  the one with the four MNIST `*-idx*-ubyte[.gz]` files; for LFW the folder holding
  `lfw-deepfunneled/`, `lfw_funneled/` or `lfw/` (preferred in that order), or the
  `<Person>/<Person>_NNNN.jpg` tree itself.
- 'tfds': `tfds.builder(name, data_dir=cfg.tfds_data_dir or None)`. A prepared data set is read
  as it is. An unprepared one is downloaded only when `cfg.download` is true (the default) AND a
  5-second TCP probe of the download host (through the environment's proxy, if any) answers:
  offline, TFDS's own downloader retries for minutes, so without the probe a user with no network
  would wait instead of reading a message. Set `download=False` to forbid any network access.
  TFDS's LFW holds the unaligned originals (`lfw.tgz`), not the deep-funneled images.
- 'auto' (default): 'local' when a folder is given (`cfg.dir` or VAE_ATTACKS_DATA_DIR), else
  'tfds'. A folder that is given but lacks the files is an error, never a silent download.

Every problem (settings, missing or corrupt files, no network) raises `DataError` with one
paragraph saying what is wrong and how to fix it. Nothing is cached or written to disk.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import io
import os
import pathlib
import socket
import threading
import urllib.parse
import urllib.request
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

DATA_ENV = "VAE_ATTACKS_DATA_DIR"
SOURCES = ("auto", "tfds", "local")
MNIST_FILES = {
  "train_images": "train-images-idx3-ubyte",
  "train_labels": "train-labels-idx1-ubyte",
  "test_images": "t10k-images-idx3-ubyte",
  "test_labels": "t10k-labels-idx1-ubyte",
}
MNIST_SIZE = 28
LFW_SIZE = 250
LFW_TREES = ("lfw-deepfunneled", "lfw_funneled", "lfw-funneled", "lfw")
PROBE_TIMEOUT_S = 5.0

# IDX type codes (http://yann.lecun.com/exdb/mnist/): the third byte of the magic number.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_HOW_TO_POINT = (
  "Point at a folder of the original files with --config.data.dir=/path/to/data or "
  f"{DATA_ENV}=/path/to/data (a folder holding mnist/*-ubyte.gz and "
  "lfw/lfw-deepfunneled/<Person>/*.jpg, or the specific data set's folder)."
)
_DEFAULT_HOSTS = {  # used only when TFDS cannot tell its download URLs
  "mnist": "https://storage.googleapis.com/cvdf-datasets/mnist/",
  "lfw": "https://ndownloader.figshare.com/files/5976018",
}


class DataError(Exception):
  """A data problem the user can fix: bad setting, missing/corrupt file, no network."""


class Dataset(NamedTuple):
  """A classification data set in memory.

  Attributes:
    name: 'mnist' or 'lfw'.
    x_train: float32 [N, H, W, C] in [0, 1].
    y_train: int32 [N], indices into `class_names`.
    x_test: float32 [M, H, W, C] in [0, 1].
    y_test: int32 [M].
    class_names: tuple of K names ('0'..'9' for MNIST; sorted person names for LFW).
  """

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  class_names: tuple[str, ...]


class _Settings(NamedTuple):
  name: str
  source: str
  dir: str
  tfds_data_dir: str
  download: bool
  min_faces_per_person: int
  crop_size: int
  image_size: int
  test_fraction: float
  split_seed: int
  max_train: int
  max_test: int
  grey: bool


# ITU-R BT.601 luma weights of (R, G, B): LFW in grey (`data.grey`), one channel.
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def load(cfg: Any) -> Dataset:
  """Loads MNIST or LFW as arrays (see the module docstring for sources and layouts).

  Args:
    cfg: the `data` config section (an ml_collections.ConfigDict, a mapping, or any object with
      attributes). Fields (missing ones take the default): name ('mnist' | 'lfw'); source
      ('auto' | 'tfds' | 'local', 'auto'); dir (str, '' = $VAE_ATTACKS_DATA_DIR); tfds_data_dir
      (str, '' = TFDS's default); download (bool, True: TFDS may download when online);
      min_faces_per_person (int, 70); crop_size (int, 154) and image_size (int; 154 for LFW,
      28 for MNIST, the only MNIST value): the LFW centre crop and the size it is box-resampled
      to; test_fraction (float in (0, 1), 0.25: LFW's test share of each person); split_seed
      (int, 0: LFW's split); max_train, max_test (int, 0 = all: else a deterministic subset
      stratified by class: the first examples of each class in the set's order, in proportion
      to the class sizes); grey (bool, False: LFW only; True turns the faces into one
      channel of BT.601 luma, `LUMA`, after resizing).

  Returns:
    A `Dataset`. MNIST from local files keeps the official order (TFDS holds the same examples
    in its own order). LFW's train and test sets are each in an order shuffled by `split_seed`,
    so that their first examples cover the people.

  Raises:
    DataError: for any setting out of range, missing or corrupt file, or unreachable download.
  """
  s = _settings(cfg)
  spec = DATASETS[s.name]
  folder, origin = _local_folder(s)
  if folder is not None:
    return spec.local(folder, origin, s)
  why = (
    "source='tfds' was asked for"
    if s.source == "tfds"
    else f"no local folder was given (data.dir is empty and {DATA_ENV} is not set)"
  )
  return spec.tfds(s, why)


# --- settings ----------------------------------------------------------------------------


def _field(cfg: Any, name: str, default: Any) -> Any:
  if isinstance(cfg, Mapping):
    return cfg.get(name, default)
  try:
    return getattr(cfg, name)
  except (AttributeError, KeyError):
    return default


def _int(cfg: Any, name: str, default: int, minimum: int) -> int:
  value = _field(cfg, name, default)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise DataError(f"data.{name}={value!r} is not allowed: it must be an integer >= {minimum}.")
  return int(value)


def _settings(cfg: Any) -> _Settings:
  """Reads and checks the config fields, naming the field at fault."""
  name = _field(cfg, "name", None)
  if name not in DATASETS:
    allowed = ", ".join(repr(n) for n in DATASETS)
    raise DataError(f"data.name={name!r} is not a known data set; allowed: {allowed}.")
  source = _field(cfg, "source", "auto")
  if source not in SOURCES:
    raise DataError(f"data.source={source!r} is not known; allowed: 'auto', 'tfds', 'local'.")
  paths = {}
  for key in ("dir", "tfds_data_dir"):
    value = _field(cfg, key, "")
    if value is None:
      value = ""
    if not isinstance(value, (str, os.PathLike)):
      raise DataError(f"data.{key}={value!r} is not allowed: it must be a path ('' = unset).")
    paths[key] = os.path.expanduser(os.fspath(value)) if value else ""
  download = _field(cfg, "download", True)
  if not isinstance(download, (bool, np.bool_)):
    raise DataError(f"data.download={download!r} is not allowed: it must be True or False.")
  crop_size = _int(cfg, "crop_size", 154, 1)
  if name == "mnist":
    image_size = _field(cfg, "image_size", MNIST_SIZE)
    if image_size not in (MNIST_SIZE, 0, None):
      raise DataError(f"data.image_size={image_size!r}: MNIST images are 28x28; allowed: 28.")
    image_size = MNIST_SIZE
  else:
    image_size = _int(cfg, "image_size", 154, 1)
    if image_size > crop_size or crop_size > LFW_SIZE:
      raise DataError(
        f"data.image_size={image_size}, data.crop_size={crop_size}: LFW images are "
        f"{LFW_SIZE}x{LFW_SIZE}, centre-cropped to crop_size and then resized to image_size; "
        f"allowed: image_size <= crop_size <= {LFW_SIZE}."
      )
  grey = _field(cfg, "grey", False)
  if not isinstance(grey, (bool, np.bool_)) or (grey and name == "mnist"):
    raise DataError(
      f"data.grey={grey!r} is not allowed: True or False for LFW (MNIST is grey already: False)."
    )
  test_fraction = _field(cfg, "test_fraction", 0.25)
  if (
    isinstance(test_fraction, bool)
    or not isinstance(test_fraction, (int, float, np.floating))
    or not 0.0 < test_fraction < 1.0
  ):
    raise DataError(
      f"data.test_fraction={test_fraction!r} is not allowed: it must be a number strictly "
      "between 0 and 1 (the share of each person's images kept for testing)."
    )
  return _Settings(
    name=name,
    source=source,
    dir=paths["dir"],
    tfds_data_dir=paths["tfds_data_dir"],
    download=bool(download),
    min_faces_per_person=_int(cfg, "min_faces_per_person", 70, 1),
    crop_size=crop_size,
    image_size=image_size,
    test_fraction=float(test_fraction),
    split_seed=_int(cfg, "split_seed", 0, 0),
    max_train=_int(cfg, "max_train", 0, 0),
    max_test=_int(cfg, "max_test", 0, 0),
    grey=bool(grey),
  )


def _local_folder(s: _Settings) -> tuple[pathlib.Path | None, str]:
  """The local folder to read and where its name came from, or (None, '') for TFDS."""
  if s.source == "tfds":
    return None, ""
  if s.dir:
    value, origin = s.dir, f"data.dir={s.dir}"
  elif os.environ.get(DATA_ENV):
    value, origin = os.environ[DATA_ENV], f"{DATA_ENV}={os.environ[DATA_ENV]}"
  elif s.source == "local":
    raise DataError(
      f"data.source='local' needs a folder, but data.dir is empty and {DATA_ENV} is not set. "
      + _HOW_TO_POINT
    )
  else:
    return None, ""
  path = pathlib.Path(value)
  if not path.is_dir():
    raise DataError(
      f"The data folder {path} (from {origin}) does not exist or is not a folder. " + _HOW_TO_POINT
    )
  return path, origin


# --- MNIST, local ------------------------------------------------------------------------


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads one IDX file (LeCun et al.'s MNIST format), gzip-compressed or not.

  The format: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
  0x0D float32, 0x0E float64), the number of dimensions n, n big-endian uint32 sizes, then the
  big-endian values in C order. Compression is recognised by gzip's magic bytes, not the name.

  Args:
    path: the file.

  Returns:
    An array of the header's shape, in native byte order.

  Raises:
    DataError: naming the file if it cannot be read, is not gzip-valid, has a bad magic number,
      or holds more or fewer bytes than its header says.
  """
  path = pathlib.Path(path)
  try:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
      raw = gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f"Cannot read the IDX file {path}: {e}. Replace it with the original.") from e
  if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
    raise DataError(
      f"{path} is not an IDX file: its magic number is {raw[:4].hex() or 'missing'}, expected "
      "0000 followed by a type code (08 for uint8) and the number of dimensions. "
      "Replace it with the original."
    )
  dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise DataError(f"{path} is truncated: it ends inside its IDX header. Replace it.")
  shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
  expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(raw) != expected:
    raise DataError(
      f"{path} is {'truncated' if len(raw) < expected else 'too long'}: its header says shape "
      f"{shape} ({expected} bytes in all), but it holds {len(raw)} bytes. Replace it with the "
      "original."
    )
  return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _mnist_file(folder: pathlib.Path, stem: str) -> pathlib.Path | None:
  """`stem` in `folder` under its usual spellings (gz or not, '-idx' or '.idx')."""
  for base in (stem, stem.replace("-idx", ".idx")):
    for suffix in (".gz", ""):
      path = folder / (base + suffix)
      if path.is_file():
        return path
  return None


def _find_mnist(root: pathlib.Path, origin: str) -> dict[str, pathlib.Path]:
  candidates = [root / sub for sub in ("", "mnist", "MNIST", "mnist/raw", "MNIST/raw")]
  for folder in candidates:
    found = {k: _mnist_file(folder, stem) for k, stem in MNIST_FILES.items()}
    if all(found.values()):
      return found
    if any(found.values()):
      missing = [MNIST_FILES[k] + ".gz" for k, v in found.items() if v is None]
      raise DataError(
        f"The MNIST folder {folder} (from {origin}) lacks {', '.join(missing)}: it needs all "
        f"four original IDX files ({', '.join(s + '.gz' for s in MNIST_FILES.values())}; "
        "uncompressed copies are accepted too)."
      )
  looked = ", ".join(str(c) for c in dict.fromkeys(candidates) if c.is_dir()) or str(root)
  raise DataError(
    f"No MNIST files found under {root} (from {origin}); looked in {looked}. Expected the four "
    f"original IDX files {', '.join(s + '.gz' for s in MNIST_FILES.values())} (uncompressed "
    "copies are accepted too). " + _HOW_TO_POINT
  )


def _mnist_local(root: pathlib.Path, origin: str, s: _Settings) -> Dataset:
  files = _find_mnist(root, origin)
  arrays = {k: read_idx(p) for k, p in files.items()}
  for split in ("train", "test"):
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    ip, lp = files[f"{split}_images"], files[f"{split}_labels"]
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
      raise DataError(f"{ip} holds {images.dtype} {images.shape}, not MNIST's uint8 [N, 28, 28].")
    if labels.dtype != np.uint8 or labels.ndim != 1 or labels.max(initial=0) > 9:
      raise DataError(f"{lp} holds {labels.dtype} {labels.shape}, not MNIST's labels 0..9 [N].")
    if len(images) != len(labels):
      raise DataError(f"{ip} has {len(images)} images but {lp} has {len(labels)} labels.")
  return _mnist_dataset(
    arrays["train_images"][..., None], arrays["train_labels"],
    arrays["test_images"][..., None], arrays["test_labels"], s,
  )  # fmt: skip


def _mnist_dataset(x_train, y_train, x_test, y_test, s: _Settings) -> Dataset:
  """uint8 [N, 28, 28, 1] images and labels -> Dataset, with the optional subsets."""
  train = _stratified_first(y_train, s.max_train)
  test = _stratified_first(y_test, s.max_test)
  return Dataset(
    name="mnist",
    x_train=_to_unit(x_train[train]),
    y_train=y_train[train].astype(np.int32),
    x_test=_to_unit(x_test[test]),
    y_test=y_test[test].astype(np.int32),
    class_names=tuple(str(d) for d in range(10)),
  )


# --- LFW, local --------------------------------------------------------------------------


def _person_images(folder: pathlib.Path) -> list[str]:
  with os.scandir(folder) as it:
    return sorted(
      e.name
      for e in it
      if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith((".jpg", ".jpeg"))
    )


def _is_person_tree(folder: pathlib.Path) -> bool:
  """True if some subfolder `P` of `folder` holds LFW-named `P_NNNN.jpg` images."""
  if not folder.is_dir():
    return False
  with os.scandir(folder) as it:
    subdirs = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
  for name in subdirs[:20]:
    if any(f.startswith(name + "_") for f in _person_images(folder / name)):
      return True
  return False


def _find_lfw(root: pathlib.Path, origin: str) -> pathlib.Path:
  candidates = [root]
  for base in (root, root / "lfw"):
    candidates += [base / tree for tree in LFW_TREES]
  for folder in candidates:
    if _is_person_tree(folder):
      return folder
  raise DataError(
    f"No LFW images found under {root} (from {origin}). Expected a tree of "
    "<Person>/<Person>_NNNN.jpg (the original, funneled or deep-funneled 250x250 JPEGs), at "
    f"{root} itself or in {root}/[lfw/]{{{','.join(LFW_TREES)}}} (extract lfw.tgz or "
    "lfw-deepfunneled.tgz there). " + _HOW_TO_POINT
  )


def _lfw_local(root: pathlib.Path, origin: str, s: _Settings) -> Dataset:
  tree = _find_lfw(root, origin)
  people = {}
  with os.scandir(tree) as it:
    for entry in it:
      if entry.is_dir() and not entry.name.startswith("."):
        images = _person_images(tree / entry.name)
        if images:
          people[entry.name] = [os.path.join(entry.path, f) for f in images]
  return _lfw_dataset(people, f"{tree} (from {origin})", s)


def _lfw_dataset(people: Mapping[str, Sequence[Any]], where: str, s: _Settings) -> Dataset:
  """Filters people, splits per person, subsets, then decodes only the images kept.

  `people` maps a person's name to their images in a fixed order, each a path or
  (description, JPEG bytes).
  """
  kept = sorted(p for p, images in people.items() if len(images) >= s.min_faces_per_person)
  if len(kept) < 2:
    top = sorted(people.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:3]
    counts = ", ".join(f"{p} {len(v)}" for p, v in top) or "no images at all"
    raise DataError(
      f"data.min_faces_per_person={s.min_faces_per_person} leaves {len(kept)} "
      f"{'person' if len(kept) == 1 else 'people'} in {where}, and a classifier needs at least "
      f"2; the most images per person there: {counts}. Lower min_faces_per_person (allowed: "
      "a value that at least two people reach) or use a fuller copy of LFW."
    )
  train, test = [], []  # (class index, image)
  for c, person in enumerate(kept):
    images = people[person]
    n = len(images)
    n_test = min(max(int(np.floor(s.test_fraction * n + 0.5)), 1 if n > 1 else 0), n - 1)
    # Seeded per person, so a person's split does not depend on who else is kept.
    order = np.random.default_rng([s.split_seed, zlib.crc32(person.encode())]).permutation(n)
    test += [(c, images[i]) for i in order[:n_test]]
    train += [(c, images[i]) for i in order[n_test:]]
  rng = np.random.default_rng([s.split_seed, len(kept)])
  train = [train[i] for i in rng.permutation(len(train))]
  test = [test[i] for i in rng.permutation(len(test))]
  train = [train[i] for i in _stratified_first(np.array([c for c, _ in train]), s.max_train)]
  test = [test[i] for i in _stratified_first(np.array([c for c, _ in test]), s.max_test)]
  x = _to_unit(_decode_faces([img for _, img in train + test], s.crop_size, s.image_size))
  if s.grey:
    x = (x @ LUMA)[..., None]
  return Dataset(
    name="lfw",
    x_train=x[: len(train)],
    y_train=np.array([c for c, _ in train], np.int32),
    x_test=x[len(train) :],
    y_test=np.array([c for c, _ in test], np.int32),
    class_names=tuple(kept),
  )


def _decode_face(image: Any, crop_size: int, image_size: int) -> np.ndarray:
  """One JPEG (path or (description, bytes)) -> uint8 [image_size, image_size, 3]."""
  from PIL import Image  # noqa: PLC0415  (PIL only when LFW is read)

  if isinstance(image, tuple):
    what, source = image[0], io.BytesIO(image[1])
  else:
    what, source = str(image), image
  try:
    with Image.open(source) as im:
      width, height = im.size
      if min(width, height) < crop_size:
        raise DataError(
          f"The image {what} is {width}x{height}, smaller than data.crop_size={crop_size}; "
          f"allowed: crop_size <= {min(width, height)} for these images."
        )
      left, top = (width - crop_size) // 2, (height - crop_size) // 2
      face = im.convert("RGB").crop((left, top, left + crop_size, top + crop_size))
      if image_size != crop_size:
        face = face.resize((image_size, image_size), Image.Resampling.BOX)
      return np.asarray(face, np.uint8)
  except DataError:
    raise
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on bad files
    raise DataError(
      f"Cannot decode the image {what}: {e}. The file is corrupt or not a JPEG; replace it."
    ) from e


def _decode_faces(images: Sequence[Any], crop_size: int, image_size: int) -> np.ndarray:
  out = np.empty((len(images), image_size, image_size, 3), np.uint8)
  if not images:
    return out

  def one(i):
    out[i] = _decode_face(images[i], crop_size, image_size)

  # PIL decodes without the GIL: threads use every core.
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
    for future in [pool.submit(one, i) for i in range(len(images))]:
      future.result()
  return out


# --- shared helpers ----------------------------------------------------------------------


def _to_unit(x: np.ndarray) -> np.ndarray:
  return np.multiply(x, np.float32(1.0 / 255.0), dtype=np.float32)


def _stratified_first(labels: np.ndarray, limit: int) -> np.ndarray:
  """Indices (ascending) of the first examples of each class, in proportion to class sizes.

  The quota of class c is floor(limit * n_c / N), the remainder going to the largest fractional
  parts (ties to the lower class index); limit = 0 or >= N keeps everything.
  """
  n = len(labels)
  if limit == 0 or limit >= n:
    return np.arange(n)
  classes, counts = np.unique(labels, return_counts=True)
  exact = limit * counts / n
  quota = np.floor(exact).astype(np.int64)
  extra = np.argsort(-(exact - quota), kind="stable")[: limit - quota.sum()]
  quota[extra] += 1
  keep = np.zeros(n, bool)
  for c, q in zip(classes, quota, strict=True):
    keep[np.flatnonzero(labels == c)[:q]] = True
  return np.flatnonzero(keep)


# --- TFDS --------------------------------------------------------------------------------


def _reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
  """Whether a TCP connection to `url`'s host (or its proxy) opens within `timeout` seconds."""
  parts = urllib.parse.urlsplit(url)
  host = parts.hostname or ""
  proxy = urllib.request.getproxies().get(parts.scheme)
  if proxy and not urllib.request.proxy_bypass(host):
    parts = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
  address = (parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
  result = []

  def probe():  # in a thread, so that a slow DNS lookup also counts against the timeout
    try:
      socket.create_connection(address, timeout=timeout).close()
      result.append(True)
    except OSError:
      pass

  thread = threading.Thread(target=probe, daemon=True)
  thread.start()
  thread.join(timeout)
  return bool(result)


def _tfds_builder(s: _Settings, why: str):
  """A TFDS builder whose data are prepared (downloading them if allowed and online)."""
  try:
    import tensorflow_datasets as tfds  # noqa: PLC0415  (TFDS only on the TFDS path)
  except ImportError as e:
    raise DataError(
      f"Loading {s.name} through TFDS ({why}) needs tensorflow-datasets, which cannot be "
      f"imported ({e}): the core install reads local files only. Add the TFDS extra "
      "(pip install -e '.[tfds]' in the repository, installs TensorFlow), or: " + _HOW_TO_POINT
    ) from e
  try:
    builder = tfds.builder(s.name, data_dir=s.tfds_data_dir or None)
    where = str(builder.data_path)
    prepared = builder.is_prepared()
  except Exception as e:
    raise DataError(f"TFDS cannot open its '{s.name}' builder ({e}). " + _HOW_TO_POINT) from e
  if prepared:
    return tfds, builder
  intro = f"Cannot load {s.name}: {why}, so TFDS was tried, and it has no prepared copy at {where}"
  if not s.download:
    raise DataError(
      f"{intro}, and data.download=False forbids downloading it. Set data.download=True to "
      "let TFDS download it, or use local files. " + _HOW_TO_POINT
    )
  try:
    urls = list(builder.url_infos or {}) or [_DEFAULT_HOSTS[s.name]]
  except Exception:  # an incomplete TFDS install cannot read its checksum files
    urls = [_DEFAULT_HOSTS[s.name]]
  hosts = {urllib.parse.urlsplit(u).hostname: u for u in urls}
  offline = [h for h, u in hosts.items() if not _reachable(u)]
  if offline:
    raise DataError(
      f"{intro}, and its download host {', '.join(offline)} cannot be reached within "
      f"{PROBE_TIMEOUT_S:g} s (no network?). " + _HOW_TO_POINT
    )
  try:
    builder.download_and_prepare()
  except Exception as e:
    raise DataError(f"{intro}, and downloading it failed: {e}. " + _HOW_TO_POINT) from e
  return tfds, builder


def _tfds_arrays(tfds, builder, split: str, decoders=None) -> dict[str, np.ndarray]:
  """A split as numpy arrays, read in batches (batch_size=-1 needs the split's size known)."""
  try:
    ds = builder.as_dataset(split=split, batch_size=4096, decoders=decoders)
    batches = list(tfds.as_numpy(ds))
  except Exception as e:
    raise DataError(
      f"TFDS could not read the '{split}' split of its prepared {builder.name} at "
      f"{builder.data_path}: {e}. Delete that folder to prepare it again, or use local files."
    ) from e
  if not batches:
    raise DataError(f"TFDS's {builder.name} at {builder.data_path} has an empty '{split}' split.")
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _mnist_tfds(s: _Settings, why: str) -> Dataset:
  tfds, builder = _tfds_builder(s, why)
  train, test = (_tfds_arrays(tfds, builder, split) for split in ("train", "test"))
  return _mnist_dataset(train["image"], train["label"], test["image"], test["label"], s)


def _lfw_tfds(s: _Settings, why: str) -> Dataset:
  tfds, builder = _tfds_builder(s, why)
  # Undecoded JPEG bytes: only the images of the people kept are decoded (by PIL, as locally).
  data = _tfds_arrays(tfds, builder, "train", decoders={"image": tfds.decode.SkipDecoding()})
  people: dict[str, list] = {}
  for i, (label, jpeg) in enumerate(zip(data["label"], data["image"], strict=True)):
    person = label.decode() if isinstance(label, bytes) else str(label)
    people.setdefault(person, []).append((f"TFDS lfw example {i} ({person})", bytes(jpeg)))
  return _lfw_dataset(people, f"TFDS lfw at {builder.data_path}", s)


# --- the datasets' table ---------------------------------------------------------------


class DatasetSpec(NamedTuple):
  """One data set the project reads.

  name: `data.name` in the configs and the `dataset` field of result rows.
  local: `(folder, origin, settings) -> Dataset` from a folder of the original files.
  tfds: `(settings, why) -> Dataset` through TensorFlow Datasets.
  full_shape: [H, W, C] of the study's full-size images (the report's pixel counts D).

  Adding a data set: its two loaders in this module and an entry here, then its model and
  attack-grid defaults in configs/base.py.
  """

  name: str
  local: Any
  tfds: Any
  full_shape: tuple[int, int, int]

  @property
  def pixels(self) -> int:
    """D = H * W * C at full size."""
    h, w, c = self.full_shape
    return h * w * c


DATASETS: dict[str, DatasetSpec] = {
  "mnist": DatasetSpec("mnist", _mnist_local, _mnist_tfds, (MNIST_SIZE, MNIST_SIZE, 1)),
  "lfw": DatasetSpec("lfw", _lfw_local, _lfw_tfds, (154, 154, 3)),
}
