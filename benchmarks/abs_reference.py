"""Schott et al.'s published ABS class VAEs run by this library's inference (issue 19, item 1).

  git clone https://github.com/bethgelab/AnalysisBySynthesis ../AnalysisBySynthesis
  python -m benchmarks.abs_reference \
    --config.weights_dir=../AnalysisBySynthesis/exp/VAE_swarm_MSE/nets --config.examples=2000

Separates the two halves of a gap in clean accuracy: is `genclf.abs_logits_fn` (the bank of 8000
codes, 50 Adam steps, the ball of radius 5) the inference of Schott et al. (2019), and is the
remaining gap in how the class VAEs are trained? Their ten trained VAEs (`ABS_<k>.net`, PyTorch
state dicts in the pre-1.6 format, read here without PyTorch) are converted to `genclf.ABSVAE`
variables (`encoder="conv"`, `decoder="conv"`: their layer shapes); their BatchNorm layers in
evaluation mode are folded into the preceding convolution (w * s, (b - mean) * s + beta with
s = gamma / sqrt(var + 1e-5)), and their transposed-convolution kernels flipped to flax's
`ConvTranspose` convention. The first converted decoder is checked against a direct NumPy
evaluation of their layers (printed: the largest difference). Printed: the accuracy of our
inference with their VAEs on the first `examples` MNIST test images (Wilson 95% interval), and
the mean training objective of the test images under their class's VAE (the `test_loss` that
`train.train_abs` logs per epoch for ours) with their encoder.

Schott et al.'s base ABS (their `get_VAE(binary=False)`) has neither binarisation nor class
scalars; it is the model converted here. Their weights are never stored in this repository.

Measured (2026-12-07, twelfth session; the 2-core CPU shared with other runs): decoder check
5.79e-07; test objective 24.3686; accuracy 0.9845 [0.9781, 0.9891] on test images 0-1999
(1,728 s), 0.990 on 0-199 (README, "Generative classifiers"). With `--config.start` (1,000 or
2,000 images a run, thirteenth and fourteenth sessions): 2000-2999 0.9830, 3000-3999 0.9850,
4000-5999 0.9895, 6000-7999 0.9960, 8000-9999 0.9970; all 10,000: 9,902 correct, 0.9902
[0.9881, 0.9920], Schott et al.'s reported 0.99.
"""

import pathlib
import pickle
import struct
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app
from ml_collections import config_flags

from configs import study_genclf
from vae_attacks import data, genclf, metrics
from vae_attacks.attacks import runner


def _settings() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.weights_dir = ""
  c.examples = 1000
  c.start = 0
  c.data = dict(study_genclf.get_config().mnist_vae.data)
  return c


_CONFIG = config_flags.DEFINE_config_dict("config", _settings())

BN_EPS = 1e-5  # PyTorch's BatchNorm2d default, which their nets use
# Their storages by the type name the pickle gives.
_STORAGE_DTYPES = {
  "FloatStorage": np.float32, "DoubleStorage": np.float64, "LongStorage": np.int64,
  "IntStorage": np.int32,
}  # fmt: skip


class _StorageType:
  def __init__(self, name: str):
    self.name = name


def _tensor_stub(storage, offset, size, stride, *_):
  return ("tensor", storage, offset, tuple(size), tuple(stride))


class _LegacyUnpickler(pickle.Unpickler):
  """The object pickle of PyTorch's legacy format, tensors left as stubs naming their storage."""

  def find_class(self, module, name):
    if module == "torch._utils" and name.startswith("_rebuild_tensor"):
      return _tensor_stub
    if module == "torch" and name.endswith("Storage"):
      return _StorageType(name)
    if module == "collections" and name == "OrderedDict":
      return dict
    raise pickle.UnpicklingError(f"unexpected class {module}.{name} in a state dict")

  def persistent_load(self, pid):
    _, storage_type, key, _, _, _ = pid
    return (storage_type.name, key)


def read_state_dict(path: pathlib.Path) -> dict[str, np.ndarray]:
  """A state dict saved by `torch.save` before PyTorch 1.6 (the legacy, non-zip format).

  The file is: three pickles (magic number, protocol version, system info), the object pickle
  (tensors refer to storages by key), a pickle of the storage keys, then each storage in that
  order as a little-endian int64 element count followed by its raw elements.
  """
  with open(path, "rb") as f:
    for _ in range(3):
      pickle.load(f)
    obj = _LegacyUnpickler(f, encoding="latin1").load()
    order = pickle.load(f)
    dtype_of = {t[1][1]: np.dtype(_STORAGE_DTYPES[t[1][0]]) for t in obj.values()}
    storages = {}
    for key in order:
      (count,) = struct.unpack("<q", f.read(8))
      storages[key] = np.frombuffer(f.read(count * dtype_of[key].itemsize), dtype_of[key])
  out = {}
  for name, (_, (_, key), offset, size, stride) in obj.items():
    buf = storages[key]
    strides = [s * buf.itemsize for s in stride]
    out[name] = np.lib.stride_tricks.as_strided(buf[offset:], size, strides).copy()
  return out


def _bn_scale_shift(sd: dict, bn: str) -> tuple[np.ndarray, np.ndarray]:
  s = sd[f"{bn}.weight"] / np.sqrt(sd[f"{bn}.running_var"] + BN_EPS)
  return s, sd[f"{bn}.bias"] - sd[f"{bn}.running_mean"] * s


def convert(sd: dict, n_enc: int = 4, n_dec: int = 4) -> dict:
  """`genclf.ABSVAE(encoder="conv", decoder="conv")` variables of one of their class VAEs.

  PyTorch Conv2d weights are [out, in, kh, kw] (a cross-correlation, as flax's `Conv`: kernel
  [kh, kw, in, out]); ConvTranspose2d weights are [in, out, kh, kw] and scatter each input
  through the kernel, which is flax's `ConvTranspose` (transpose_kernel=False) with the kernel
  flipped in both spatial axes. A BatchNorm after a layer (all but each net's last) is folded.
  """
  params = {}
  enc_names = [f"enc_layers_{i}" for i in range(n_enc - 1)] + ["head"]
  dec_names = [f"dec_layers_{i}" for i in range(n_dec - 1)] + ["pixels"]
  for part, names, transposed in (("Encoder", enc_names, False), ("Decoder", dec_names, True)):
    for i, name in enumerate(names):
      w, b = sd[f"{part}.conv_{i}.weight"], sd[f"{part}.conv_{i}.bias"]
      if transposed:
        kernel = np.flip(w.transpose(2, 3, 0, 1), (0, 1))
      else:
        kernel = w.transpose(2, 3, 1, 0)
      if f"{part}.bn_{i}.weight" in sd:
        s, shift = _bn_scale_shift(sd, f"{part}.bn_{i}")
        kernel, b = kernel * s, b * s + shift
      params[name] = {"kernel": np.ascontiguousarray(kernel, np.float32),
                      "bias": np.asarray(b, np.float32)}  # fmt: skip
  return {"params": params}


def reference_decode(sd: dict, z: np.ndarray, strides=(1, 2, 2, 1)) -> np.ndarray:
  """Their decoder in evaluation mode on one code z [D], in NumPy: transposed convolutions as
  scatter-adds, BatchNorm with the running statistics, ELU, sigmoid. Returns [H, W, C]."""
  h = np.asarray(z, np.float64).reshape(1, 1, -1)
  for i, stride in enumerate(strides):
    w, b = sd[f"Decoder.conv_{i}.weight"], sd[f"Decoder.conv_{i}.bias"]
    _, cout, kh, kw = w.shape
    height, width = h.shape[:2]
    out = np.zeros(((height - 1) * stride + kh, (width - 1) * stride + kw, cout))
    for r in range(height):
      for c in range(width):
        out[r * stride : r * stride + kh, c * stride : c * stride + kw] += np.einsum(
          "i,iokl->klo", h[r, c], w
        )
    out = out + b
    if f"Decoder.bn_{i}.weight" in sd:
      s, shift = _bn_scale_shift(sd, f"Decoder.bn_{i}")
      out = np.where(out * s + shift > 0, out * s + shift, np.expm1(out * s + shift))
    h = out
  return 1.0 / (1.0 + np.exp(-h))


def main(_):
  c = _CONFIG.value
  weights = pathlib.Path(c.weights_dir)
  files = [weights / f"ABS_{k}.net" for k in range(10)]
  if not c.weights_dir or not all(f.is_file() for f in files):
    raise SystemExit(
      f"weights_dir={c.weights_dir!r}: must be the folder holding ABS_0.net ... ABS_9.net "
      "(AnalysisBySynthesis/exp/VAE_swarm_MSE/nets of github.com/bethgelab/AnalysisBySynthesis)"
    )
  sds = [read_state_dict(f) for f in files]
  vae = genclf.ABSVAE(image_shape=(28, 28, 1), latent_dim=8, encoder="conv", decoder="conv")
  class_params = jax.tree.map(lambda *a: jnp.stack(a), *[convert(sd) for sd in sds])
  z = np.random.default_rng(0).normal(size=8).astype(np.float32)
  first = jax.tree.map(lambda a: a[0], class_params)
  ours = np.asarray(vae.apply(first, jnp.asarray(z)[None], method="decode"))[0]
  gap = np.abs(ours - reference_decode(sds[0], z)).max()
  print(f"decoder 0: max |ours - NumPy reference| = {gap:.2e}")
  ds = data.load(c.data)
  rows = jnp.asarray(genclf.per_class_rows(ds.x_test, ds.y_test, 10))
  loss = jax.jit(
    lambda p, x, k: genclf.abs_training_loss(vae, p, x, k, False)
  )  # their encoder's mean and variance, one noise draw per class
  objective = np.mean([
    float(loss(jax.tree.map(lambda a, k=k: a[k], class_params), rows[:, k], jax.random.key(k)))
    for k in range(10)
  ])  # fmt: skip
  print(f"test objective (sum of squared errors + KL, per image, their encoders): {objective:.4f}")
  if c.examples <= 0:
    return
  t0 = time.time()
  params = genclf.abs_params(vae, class_params, jax.random.key(1), n_samples=8000)
  fn = genclf.abs_logits_fn(vae, steps=50, lr=0.05, radius=5.0, logit_scale=440.0)
  x = ds.x_test[c.start : c.start + c.examples]
  y = ds.y_test[c.start : c.start + c.examples]
  pred = np.asarray(runner.batched_logits(fn, params, x)).argmax(-1)
  right = int(np.sum(pred == y))
  lo, hi = (float(v) for v in metrics.wilson_interval(right, len(y)))
  print(f"{'test images':>14} | {'accuracy':>8} | {'Wilson 95%':>15} | {'seconds':>7}")
  print(f"{c.start}-{c.start + len(y) - 1:>8} | {right / len(y):8.4f} | "
        f"[{lo:.4f}, {hi:.4f}] | {time.time() - t0:7.0f}")  # fmt: skip


if __name__ == "__main__":
  app.run(main)
