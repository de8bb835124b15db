"""vae_attacks.data: IDX parsing, the LFW identification split, sources and errors."""

import gzip
import hashlib
import io
import socket
import struct
import time

import numpy as np
import pytest
from fakedata import idx_bytes, make_lfw_dir, make_mnist_dir, mnist_like, write_idx
from PIL import Image

from vae_attacks import data

PEOPLE = {"Alice_Smith": 12, "Bob_Jones": 10, "Carol_White": 4}


def _cfg(**kw):
  base = dict(name="lfw", source="local", dir="", tfds_data_dir="", split_seed=0)
  base.update(kw)
  return base


def _hashes(x):
  return [hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest() for a in x]


@pytest.fixture
def no_env(monkeypatch):
  monkeypatch.delenv(data.DATA_ENV, raising=False)


@pytest.fixture(scope="module")
def lfw_tree(tmp_path_factory):
  """A small LFW tree of 40x40 JPEGs: 3 people with 12, 10 and 4 images."""
  return make_lfw_dir(tmp_path_factory.mktemp("lfw") / "lfw-deepfunneled", PEOPLE, size=40)


def _crops(tree, people, crop):
  """Reference centre crops of every image of `people`, straight from PIL."""
  out = {}
  for person in people:
    for path in sorted((tree / person).glob("*.jpg")):
      im = np.asarray(Image.open(path).convert("RGB"))
      o = (im.shape[0] - crop) // 2
      out[path.name] = im[o : o + crop, o : o + crop]
  return out


# --- IDX ---------------------------------------------------------------------------------


def test_idx_header_matches_the_format():
  """The writer follows LeCun's spec: 00 00 <type> <ndim>, big-endian sizes, big-endian data."""
  raw = idx_bytes(np.array([[1, 2, 3], [4, 5, 6]], np.int32))
  assert raw[:4] == bytes([0, 0, 0x0C, 2])
  assert struct.unpack(">II", raw[4:12]) == (2, 3)
  assert struct.unpack(">6i", raw[12:]) == (1, 2, 3, 4, 5, 6)


def test_read_idx_parses_hand_written_bytes(tmp_path):
  path = tmp_path / "x-idx2-ubyte"
  path.write_bytes(b"\0\0\x08\x02" + struct.pack(">II", 2, 3) + bytes(range(6)))
  x = data.read_idx(path)
  assert x.dtype == np.uint8 and x.shape == (2, 3)
  np.testing.assert_array_equal(x, np.arange(6).reshape(2, 3))


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, dtype, suffix):
  rng = np.random.default_rng(0)
  x = (rng.normal(0, 50, (3, 4, 5))).astype(dtype)
  path = write_idx(tmp_path / f"a-idx3-ubyte{suffix}", x)
  assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")
  y = data.read_idx(path)
  assert y.dtype == np.dtype(dtype) and y.dtype.isnative
  np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize(
  "corrupt, words",
  [
    (lambda raw: gzip.compress(raw)[:-20], "Cannot read"),  # truncated gzip stream
    (lambda raw: b"\x1f\x8b" + raw[2:], "Cannot read"),  # gzip magic, garbage inside
    (lambda raw: raw[:-1], "truncated"),
    (lambda raw: raw + b"\0", "too long"),
    (lambda raw: raw[:6], "truncated"),  # ends inside the header
    (lambda raw: b"\x01\x02" + raw[2:], "magic"),
    (lambda raw: b"\0\0\x07" + raw[3:], "magic"),  # unknown type code
    (lambda raw: b"", "magic"),
  ],
)
def test_corrupt_idx_names_the_file(tmp_path, corrupt, words):
  raw = idx_bytes(np.zeros((4, 28, 28), np.uint8))
  path = tmp_path / "train-images-idx3-ubyte.gz"
  path.write_bytes(corrupt(raw))
  with pytest.raises(data.DataError, match=words) as e:
    data.read_idx(path)
  assert str(path) in str(e.value)


# --- MNIST, local ------------------------------------------------------------------------


def test_mnist_local_matches_the_files(tmp_path, no_env):
  make_mnist_dir(tmp_path / "mnist", n_train=30, n_test=20, seed=3)
  d = data.load(dict(name="mnist", dir=str(tmp_path)))
  images, labels = mnist_like(30, 3)
  assert d.name == "mnist" and d.class_names == tuple("0123456789")
  assert d.x_train.shape == (30, 28, 28, 1) and d.x_train.dtype == np.float32
  assert d.y_train.dtype == np.int32 and d.x_test.shape == (20, 28, 28, 1)
  np.testing.assert_array_equal(np.round(d.x_train[..., 0] * 255), images)
  np.testing.assert_array_equal(d.y_train, labels)
  assert d.x_train.min() >= 0 and d.x_train.max() == 1.0


def test_mnist_folder_layouts_and_env_agree(tmp_path, monkeypatch, no_env):
  make_mnist_dir(tmp_path / "root" / "mnist", n_train=20, n_test=10)
  # The same files uncompressed, with the '.idx' spelling of some distributions.
  plain = tmp_path / "plain"
  plain.mkdir()
  for gz in (tmp_path / "root" / "mnist").glob("*.gz"):
    (plain / gz.name[:-3].replace("-idx", ".idx")).write_bytes(gzip.decompress(gz.read_bytes()))
  ref = data.load(dict(name="mnist", dir=str(tmp_path / "root")))
  loads = [
    data.load(dict(name="mnist", dir=str(tmp_path / "root" / "mnist"))),
    data.load(dict(name="mnist", source="local", dir=str(plain))),
  ]
  monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "root"))
  loads.append(data.load(dict(name="mnist")))
  for d in loads:
    for a, b in zip(ref, d, strict=True):
      np.testing.assert_array_equal(a, b)


def test_mnist_missing_file_is_listed(tmp_path, no_env):
  folder = make_mnist_dir(tmp_path / "mnist", n_train=10, n_test=10)
  (folder / "t10k-labels-idx1-ubyte.gz").unlink()
  with pytest.raises(data.DataError, match="lacks t10k-labels-idx1-ubyte.gz") as e:
    data.load(dict(name="mnist", dir=str(tmp_path)))
  assert str(folder) in str(e.value)


def test_mnist_empty_folder_says_what_it_expects(tmp_path, no_env):
  with pytest.raises(data.DataError) as e:
    data.load(dict(name="mnist", dir=str(tmp_path)))
  for stem in data.MNIST_FILES.values():
    assert stem in str(e.value)
  assert data.DATA_ENV in str(e.value)


def test_mnist_corrupt_archive_is_named(tmp_path, no_env):
  folder = make_mnist_dir(tmp_path, n_train=10, n_test=10)
  bad = folder / "train-images-idx3-ubyte.gz"
  bad.write_bytes(bad.read_bytes()[:-30])
  with pytest.raises(data.DataError, match="train-images-idx3-ubyte.gz"):
    data.load(dict(name="mnist", dir=str(folder)))


def test_mnist_subset_is_stratified_and_first_of_each_class(tmp_path, no_env):
  make_mnist_dir(tmp_path, n_train=100, n_test=50)
  full = data.load(dict(name="mnist", dir=str(tmp_path)))
  d = data.load(dict(name="mnist", dir=str(tmp_path), max_train=30, max_test=50))
  assert np.bincount(d.y_train, minlength=10).tolist() == [3] * 10
  first = np.sort(np.concatenate([np.flatnonzero(full.y_train == c)[:3] for c in range(10)]))
  np.testing.assert_array_equal(d.x_train, full.x_train[first])
  np.testing.assert_array_equal(d.x_test, full.x_test)


def test_stratified_quotas_follow_largest_remainders():
  labels = np.array([0] * 6 + [1] * 3 + [2] * 1)
  # Exact shares of 5: 3, 1.5, 0.5 -> floors 3, 1, 0; the one left goes to the tie's lower class.
  np.testing.assert_array_equal(data._stratified_first(labels, 5), [0, 1, 2, 6, 7])
  np.testing.assert_array_equal(data._stratified_first(labels, 0), np.arange(10))
  np.testing.assert_array_equal(data._stratified_first(labels, 99), np.arange(10))


# --- LFW, local --------------------------------------------------------------------------


def test_lfw_identification_split(lfw_tree, no_env):
  d = data.load(_cfg(dir=str(lfw_tree), min_faces_per_person=5, crop_size=24, image_size=24))
  assert d.class_names == ("Alice_Smith", "Bob_Jones")  # Carol has 4 < 5 images
  assert d.x_train.shape == (16, 24, 24, 3) and d.x_test.shape == (6, 24, 24, 3)
  assert d.x_train.dtype == np.float32 and 0 <= d.x_train.min() and d.x_train.max() <= 1
  # 25% of each person, rounded: 12 -> 3, 10 -> 2.5 -> 3.
  assert np.bincount(d.y_test).tolist() == [3, 3] and np.bincount(d.y_train).tolist() == [9, 7]
  # Every image of the kept people, once, labelled with its person, cropped at the centre.
  ref = _crops(lfw_tree, d.class_names, 24)
  ref_label = dict(zip(_hashes(ref.values()), (n.rsplit("_", 1)[0] for n in ref), strict=True))
  got = np.round(np.concatenate([d.x_train, d.x_test]) * 255).astype(np.uint8)
  hashes = _hashes(got)
  assert sorted(hashes) == sorted(ref_label)
  labels = np.concatenate([d.y_train, d.y_test])
  assert [ref_label[h] for h in hashes] == [d.class_names[c] for c in labels]


def test_lfw_split_depends_on_the_seed_only(lfw_tree, no_env):
  cfg = _cfg(dir=str(lfw_tree), min_faces_per_person=4, crop_size=8, image_size=8)
  a, b = data.load(cfg), data.load(cfg)
  c = data.load({**cfg, "split_seed": 1})
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)
  assert set(_hashes(a.x_test)) != set(_hashes(c.x_test))
  assert sorted(_hashes(np.concatenate([a.x_train, a.x_test]))) == sorted(
    _hashes(np.concatenate([c.x_train, c.x_test]))
  )
  # A person's split does not change when another person is left out.
  narrow = data.load({**cfg, "min_faces_per_person": 10})
  alice = lambda d: set(_hashes(d.x_test[d.y_test == d.class_names.index("Alice_Smith")]))
  assert alice(narrow) == alice(a)


def test_lfw_test_fraction_and_subsets(lfw_tree, no_env):
  cfg = _cfg(dir=str(lfw_tree), min_faces_per_person=4, crop_size=8, image_size=8)
  d = data.load({**cfg, "test_fraction": 0.5})
  assert np.bincount(d.y_test).tolist() == [6, 5, 2]
  sub = data.load({**cfg, "test_fraction": 0.5, "max_train": 7, "max_test": 3})
  assert np.bincount(sub.y_train, minlength=3).tolist() == [3, 3, 1]  # of 6, 5, 2
  assert np.bincount(sub.y_test, minlength=3).tolist() == [1, 1, 1]
  assert set(_hashes(sub.x_train)) <= set(_hashes(d.x_train))
  assert set(_hashes(sub.x_test)) <= set(_hashes(d.x_test))


def test_lfw_downscale_is_an_area_average(lfw_tree, no_env):
  cfg = _cfg(dir=str(lfw_tree), min_faces_per_person=10)
  big = data.load({**cfg, "crop_size": 24, "image_size": 24})
  small = data.load({**cfg, "crop_size": 24, "image_size": 12})
  assert small.x_train.shape[1:] == (12, 12, 3)
  np.testing.assert_array_equal(big.y_train, small.y_train)
  pooled = big.x_train.reshape(-1, 12, 2, 12, 2, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(small.x_train, pooled, atol=1.0 / 255 + 1e-6)


def test_lfw_real_size_default_crop(tmp_path, no_env):
  tree = make_lfw_dir(tmp_path / "lfw" / "lfw", {"A_A": 2, "B_B": 3}, size=250)
  d = data.load(_cfg(dir=str(tmp_path), min_faces_per_person=2))
  assert d.x_train.shape[1:] == (154, 154, 3) and len(d.x_train) + len(d.x_test) == 5
  ref = _crops(tree, ["A_A", "B_B"], 154)
  assert set(_hashes(np.round(d.x_test * 255).astype(np.uint8))) <= set(_hashes(ref.values()))


def test_lfw_folder_layouts_agree(lfw_tree, tmp_path, no_env):
  cfg = _cfg(min_faces_per_person=4, crop_size=8, image_size=8)
  ref = data.load({**cfg, "dir": str(lfw_tree)})
  (tmp_path / "lfw").mkdir()
  (tmp_path / "lfw" / "lfw_funneled").symlink_to(lfw_tree)
  # The folder holding the tree, and a data root holding lfw/.
  for folder in (lfw_tree.parent, tmp_path / "lfw", tmp_path):
    d = data.load({**cfg, "dir": str(folder)})
    for a, b in zip(ref, d, strict=True):
      np.testing.assert_array_equal(a, b)


def test_lfw_min_faces_too_high(lfw_tree, no_env):
  with pytest.raises(data.DataError, match="min_faces_per_person=11 leaves 1 person") as e:
    data.load(_cfg(dir=str(lfw_tree), min_faces_per_person=11, crop_size=8, image_size=8))
  assert "Alice_Smith 12" in str(e.value)


@pytest.mark.parametrize("content", [b"not a jpeg at all", "truncated"])
def test_lfw_corrupt_jpeg_is_named(tmp_path, no_env, content):
  tree = make_lfw_dir(tmp_path, {"A_A": 3, "B_B": 3}, size=32)
  bad = tree / "B_B" / "B_B_0002.jpg"
  bad.write_bytes(bad.read_bytes()[:200] if content == "truncated" else content)
  with pytest.raises(data.DataError, match="Cannot decode") as e:
    data.load(_cfg(dir=str(tree), min_faces_per_person=3, crop_size=16, image_size=16))
  assert str(bad) in str(e.value)


def test_lfw_crop_larger_than_images(lfw_tree, no_env):
  with pytest.raises(data.DataError, match="crop_size=48"):
    data.load(_cfg(dir=str(lfw_tree), min_faces_per_person=4, crop_size=48, image_size=48))


def test_lfw_folder_without_images(tmp_path, no_env):
  (tmp_path / "lfw" / "lfw-deepfunneled").mkdir(parents=True)
  with pytest.raises(data.DataError, match="No LFW images") as e:
    data.load(_cfg(dir=str(tmp_path)))
  assert data.DATA_ENV in str(e.value)


# --- where to look, settings ---------------------------------------------------------------


def test_missing_env_folder_names_the_variable(tmp_path, monkeypatch):
  monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "nowhere"))
  with pytest.raises(data.DataError, match=f"from {data.DATA_ENV}=.*does not exist"):
    data.load(dict(name="mnist"))


def test_local_without_a_folder(no_env):
  with pytest.raises(data.DataError) as e:
    data.load(dict(name="mnist", source="local"))
  assert data.DATA_ENV in str(e.value) and "--config.data.dir" in str(e.value)


@pytest.mark.parametrize(
  "field, value",
  [
    ("name", "cifar10"),
    ("source", "web"),
    ("image_size", 200),  # > crop_size 154
    ("crop_size", 300),  # > 250
    ("test_fraction", 0.0),
    ("test_fraction", 1.0),
    ("test_fraction", "0.3"),
    ("min_faces_per_person", 0),
    ("max_train", -1),
    ("split_seed", 1.5),
    ("download", "yes"),
  ],
)
def test_bad_settings_name_the_field(tmp_path, field, value):
  with pytest.raises(data.DataError, match=f"data.{field}="):
    data.load(_cfg(dir=str(tmp_path), **{field: value}))


def test_mnist_image_size_must_be_28(tmp_path):
  with pytest.raises(data.DataError, match="data.image_size=32.*allowed: 28"):
    data.load(dict(name="mnist", dir=str(tmp_path), image_size=32))


def test_attribute_configs_work(tmp_path, no_env):
  ml_collections = pytest.importorskip("ml_collections")
  make_mnist_dir(tmp_path, n_train=10, n_test=10)
  cfg = ml_collections.ConfigDict(dict(name="mnist", source="auto", dir=str(tmp_path)))
  cfg.lock()  # unknown fields read as their defaults, not errors
  assert data.load(cfg).x_train.shape == (10, 28, 28, 1)


# --- TFDS ----------------------------------------------------------------------------------


def test_reachable_probe_is_bounded():
  server = socket.socket()
  server.bind(("127.0.0.1", 0))
  server.listen(1)
  port = server.getsockname()[1]
  try:
    assert data._reachable(f"http://127.0.0.1:{port}/x", timeout=2)
  finally:
    server.close()
  start = time.perf_counter()
  assert not data._reachable(f"http://127.0.0.1:{port}/x", timeout=2)
  assert time.perf_counter() - start < 3


def test_tfds_without_download_fails_fast(tmp_path, no_env):
  pytest.importorskip("tensorflow_datasets")
  start = time.perf_counter()
  with pytest.raises(data.DataError) as e:
    data.load(dict(name="mnist", tfds_data_dir=str(tmp_path), download=False))
  message = str(e.value)
  assert time.perf_counter() - start < 30
  assert str(tmp_path) in message and "data.download=False" in message
  assert data.DATA_ENV in message and "--config.data.dir" in message
  assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("name", ["mnist", "lfw"])
def test_tfds_offline_fails_fast(tmp_path, monkeypatch, no_env, name):
  """Offline, no download is tried (TFDS's own retries take minutes): the probe decides."""
  pytest.importorskip("tensorflow_datasets")
  probed = []
  monkeypatch.setattr(data, "_reachable", lambda url, timeout=5: probed.append(url) or False)
  start = time.perf_counter()
  with pytest.raises(data.DataError, match="cannot be reached") as e:
    data.load(dict(name=name, tfds_data_dir=str(tmp_path)))
  assert time.perf_counter() - start < 30
  assert probed and data.DATA_ENV in str(e.value)
  assert not any(tmp_path.iterdir())


def test_default_config_offline_fails_fast(tmp_path, monkeypatch, no_env):
  """The real thing, unmocked, where there is no network (as in CI): a quick DataError."""
  pytest.importorskip("tensorflow_datasets")
  from tensorflow_datasets.core import constants  # noqa: PLC0415

  if data._reachable(data._DEFAULT_HOSTS["mnist"], timeout=2):
    pytest.skip("online: TFDS would download MNIST")
  monkeypatch.setattr(constants, "DATA_DIR", str(tmp_path))  # TFDS's default data_dir ('')
  start = time.perf_counter()
  with pytest.raises(data.DataError, match="cannot be reached") as e:
    data.load(dict(name="mnist", source="auto", dir="", tfds_data_dir=""))
  assert time.perf_counter() - start < 30
  assert str(tmp_path) in str(e.value) and data.DATA_ENV in str(e.value)


@pytest.fixture
def tfds_prepared(monkeypatch):
  """tfds.testing.mock_data, with the builders claiming to be prepared."""
  tfds = pytest.importorskip("tensorflow_datasets")
  monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
  return tfds


def test_tfds_mnist_arrays(tfds_prepared, no_env):
  with tfds_prepared.testing.mock_data(num_examples=12):
    d = data.load(dict(name="mnist", source="tfds", max_test=10))
  assert d.x_train.shape == (12, 28, 28, 1) and d.x_test.shape[1:] == (28, 28, 1)
  assert len(d.x_test) == 10 and d.y_train.dtype == np.int32 and d.x_train.dtype == np.float32
  assert set(d.y_train.tolist()) <= set(range(10)) and d.class_names == tuple("0123456789")
  # Pixels are the uint8 values over 255.
  np.testing.assert_allclose(d.x_train * 255, np.round(d.x_train * 255), atol=1e-3)
  assert 0 <= d.x_train.min() and d.x_train.max() <= 1


def test_tfds_lfw_goes_through_the_identification_split(tfds_prepared, no_env):
  tfds = tfds_prepared
  tf = pytest.importorskip("tensorflow")
  rng = np.random.default_rng(0)
  names = ["Zed_Z"] * 6 + ["Amy_A"] * 5 + ["Solo_S"] * 1
  jpegs = []
  for _ in names:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (250, 250, 3), dtype=np.uint8)).save(buf, "JPEG")
    jpegs.append(buf.getvalue())

  def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
    # Serialized-like examples, decoded by TFDS's own features (honouring `decoders`).
    ds = tf.data.Dataset.from_tensor_slices({"label": names, "image": jpegs})
    return ds.map(lambda ex: self.info.features.decode_example(ex, decoders=decoders))

  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    d = data.load(dict(name="lfw", source="tfds", min_faces_per_person=5, image_size=32))
  assert d.class_names == ("Amy_A", "Zed_Z")
  assert np.bincount(d.y_test).tolist() == [1, 2] and np.bincount(d.y_train).tolist() == [4, 4]
  assert d.x_train.shape == (8, 32, 32, 3)


# --- real data -----------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_mnist(real_data_dir):
  d = data.load(dict(name="mnist", dir=str(real_data_dir)))
  assert d.x_train.shape == (60000, 28, 28, 1) and d.x_test.shape == (10000, 28, 28, 1)
  assert d.y_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
  assert d.y_test[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
  assert np.bincount(d.y_train).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265,
                                              5851, 5949]  # fmt: skip
  assert abs(d.x_train.mean() * 255 - 33.32) < 0.01 and abs(d.x_test.mean() * 255 - 33.79) < 0.01


@pytest.mark.realdata
def test_real_lfw(real_data_dir):
  d = data.load(dict(name="lfw", dir=str(real_data_dir)))
  counts = {"Ariel_Sharon": 77, "Colin_Powell": 236, "Donald_Rumsfeld": 121,
            "George_W_Bush": 530, "Gerhard_Schroeder": 109, "Hugo_Chavez": 71,
            "Tony_Blair": 144}  # fmt: skip
  assert d.class_names == tuple(sorted(counts))
  assert len(d.x_train) + len(d.x_test) == 1288 and d.x_train.shape[1:] == (154, 154, 3)
  total = np.bincount(d.y_train, minlength=7) + np.bincount(d.y_test, minlength=7)
  assert total.tolist() == [counts[p] for p in d.class_names]
  assert len(d.x_test) == 322  # 25% of each person, rounded
  assert 0 <= d.x_test.min() and d.x_test.max() <= 1 and d.x_test.max() > 0.9


@pytest.mark.realdata
def test_real_lfw_quick(real_data_dir):
  d = data.load(
    dict(name="lfw", dir=str(real_data_dir), image_size=32, max_train=400, max_test=200)
  )
  assert d.x_train.shape == (400, 32, 32, 3) and d.x_test.shape == (200, 32, 32, 3)
  assert (np.bincount(d.y_train, minlength=7) > 0).all()
