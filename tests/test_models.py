"""Models: output shapes, exact parameter counts (arithmetic written out), per-example functions."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vae_attacks import models


def _count(module, *args, **kwargs):
  """Parameter count from shapes only (jax.eval_shape allocates nothing)."""
  shapes = jax.eval_shape(functools.partial(module.init, **kwargs), *args)
  return models.param_count(shapes), shapes


def _params(module, *args, **kwargs):
  """Variables drawn with numpy (module.init would compile threefry for every shape: slow)."""
  _, shapes = _count(module, jax.random.key(0), *args, **kwargs)
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def _uniform(*shape):
  return np.random.default_rng(1).uniform(size=shape).astype(np.float32)


def _batched(fn, in_axes):
  """jit(vmap(fn)): eager per-op dispatch would compile every primitive on its own."""
  return jax.jit(jax.vmap(fn, in_axes=in_axes))


def _conv(k, cin, cout):
  return k * k * cin * cout + cout


def _dense(nin, nout):
  return nin * nout + nout


@pytest.mark.parametrize(
  "shape, expected",
  [
    # conv 3x3 1->32, conv 3x3 32->64, 28 -> 14 -> 7 after two 2x2 pools, fc 7*7*64 -> 128 -> 10
    ((28, 28, 1), (9 * 1 * 32 + 32) + (9 * 32 * 64 + 64) + (7 * 7 * 64 * 128 + 128) + 1290),
    # the same on 32x32x3: 32 -> 16 -> 8
    ((32, 32, 3), (9 * 3 * 32 + 32) + (9 * 32 * 64 + 64) + (8 * 8 * 64 * 128 + 128) + 1290),
  ],
)
def test_cnn_shapes_and_param_count(key, shape, expected):
  model = models.CNN(10)
  x = jax.ShapeDtypeStruct((3, *shape), jnp.float32)
  count, params = _count(model, key, x)
  assert count == expected
  assert jax.eval_shape(model.apply, params, x).shape == (3, 10)


def test_cnn_large_faces_config_by_eval_shape(key):
  model = models.CNN(7, features=(16, 32, 64, 128), stem_stride=2)
  x = jax.ShapeDtypeStruct((2, 154, 154, 3), jnp.float32)
  count, params = _count(model, key, x)
  # stride-2 stem 154 -> 77, then SAME pools 77 -> 39 -> 20 -> 10 -> 5
  expected = (
    _conv(3, 3, 16)
    + _conv(3, 16, 32)
    + _conv(3, 32, 64)
    + _conv(3, 64, 128)
    + _dense(5 * 5 * 128, 128)
    + _dense(128, 7)
  )
  assert count == expected
  out = jax.eval_shape(model.apply, params, x)
  assert out.shape == (2, 7)


def test_cnn_global_pool_and_two_convs_per_stage(key):
  model = models.CNN(5, features=(8, 16), dense=(), convs_per_stage=2, global_pool=True)
  count, _ = _count(model, key, jnp.zeros((1, 32, 32, 3)))
  assert count == _conv(3, 3, 8) + _conv(3, 8, 8) + _conv(3, 8, 16) + _conv(3, 16, 16) + _dense(
    16, 5
  )


def test_cnn_dropout_only_in_training(key):
  model = models.CNN(10, features=(4,), dense=(16,), dropout_rate=0.5)
  x = _uniform(4, 8, 8, 1)
  params = _params(model, x)
  plain = models.CNN(10, features=(4,), dense=(16,))
  chex.assert_trees_all_close(jax.jit(model.apply)(params, x), jax.jit(plain.apply)(params, x))
  apply = jax.jit(lambda k: model.apply(params, x, train=True, rngs={"dropout": k}))
  assert not np.allclose(apply(jax.random.key(1)), apply(jax.random.key(2)))


def test_mlp_vae_shapes_and_param_count(key):
  vae = models.MLPVAE((28, 28, 1), 20)
  x = jax.ShapeDtypeStruct((3, 28, 28, 1), jnp.float32)
  count, params = _count(vae, key, x, key)
  encoder = _dense(784, 512) + _dense(512, 256) + 2 * _dense(256, 20)
  decoder = _dense(20, 256) + _dense(256, 512) + _dense(512, 784)
  assert count == encoder + decoder == 1_082_680
  logits, mean, logvar = jax.eval_shape(vae.apply, params, x, key)
  chex.assert_shape(logits, (3, 28, 28, 1))
  chex.assert_shape([mean, logvar], (3, 20))


def test_vae_call_is_the_reparameterised_decode(key):
  vae = models.MLPVAE((6, 5, 2), 3, hidden=(7,))
  x = _uniform(4, 6, 5, 2)
  params = _params(vae, x, key)
  sample_key = jax.random.key(5)

  @jax.jit
  def both(params, x, k):
    logits, mean, logvar = vae.apply(params, x, k)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(k, mean.shape)
    return logits, vae.apply(params, z, method="decode")

  logits, expected = both(params, x, sample_key)
  chex.assert_trees_all_close(logits, expected, atol=1e-6)


@pytest.mark.parametrize("upsample, factor", [("subpixel", 4), ("transpose", 1)])
@pytest.mark.parametrize("shape, grid", [((28, 28, 1), (7, 7)), ((32, 32, 3), (8, 8))])
def test_conv_vae_shapes_and_param_count(key, shape, grid, upsample, factor):
  c = shape[2]
  vae = models.ConvVAE(shape, 8, features=(32, 64), upsample=upsample)
  x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
  count, params = _count(vae, key, x, key)
  flat = grid[0] * grid[1] * 64
  encoder = _conv(3, c, 32) + _conv(3, 32, 64) + 2 * _dense(flat, 8)
  # a sub-pixel upsampling to C channels is a 3x3 convolution to 4C channels
  decoder = _dense(8, flat) + _conv(3, 64, factor * 32) + _conv(3, 32, factor * c)
  assert count == encoder + decoder
  logits, mean, logvar = jax.eval_shape(vae.apply, params, x, key)
  chex.assert_shape(logits, (2, *shape))
  chex.assert_shape([mean, logvar], (2, 8))


def test_conv_vae_at_lfw_size_by_eval_shape(key):
  """The study's LFW conv VAE (configs/base.py's model.conv_vae at 154x154x3), counted by
  hand: a change of the config or of the module's layers changes the count."""
  from configs import base

  cfg = base.get_config(dataset="lfw", models=("conv_vae",), quick=False).model.conv_vae
  vae = models.ConvVAE((154, 154, 3), **cfg)
  x = jax.ShapeDtypeStruct((2, 154, 154, 3), jnp.float32)
  count, params = _count(vae, key, x, key)
  # 154 -> 77 -> 39 -> 20 -> 10 -> 5; the decoder grows 5 -> 160 and crops to 154
  assert tuple(cfg.features) == (16, 32, 64, 64, 64) and tuple(cfg.hidden) == ()
  latent, flat = cfg.latent_dim, 5 * 5 * 64
  encoder = (
    _conv(3, 3, 16) + _conv(3, 16, 32) + _conv(3, 32, 64) + _conv(3, 64, 64) + _conv(3, 64, 64)
    + 2 * _dense(flat, latent)
  )  # fmt: skip
  decoder = (
    _dense(latent, flat)
    + _conv(3, 64, 4 * 64) + _conv(3, 64, 4 * 64) + _conv(3, 64, 4 * 32) + _conv(3, 32, 4 * 16)
    + _conv(3, 16, 4 * 3)
  )  # fmt: skip
  assert count < 1.25e6  # 4 bytes each: a parameter file under 5 MB, committed with the record
  assert count == encoder + decoder
  logits, mean, _ = jax.eval_shape(vae.apply, params, x, key)
  assert logits.shape == (2, 154, 154, 3)
  assert mean.shape == (2, latent)


def test_latent_classifier_param_count(key):
  clf = models.LatentClassifier(10, hidden=(128, 64))
  count, _ = _count(clf, key, jnp.zeros((1, 20)))
  assert count == _dense(20, 128) + _dense(128, 64) + _dense(64, 10)


def test_classifier_fn_matches_batched_apply(key):
  model = models.CNN(4, features=(4, 8), dense=(16,))
  x = _uniform(5, 12, 12, 3)
  params = _params(model, x)
  logits_fn = models.classifier_fns(model)
  per_example = _batched(logits_fn, in_axes=(None, 0))(params, x)
  chex.assert_trees_all_close(per_example, jax.jit(model.apply)(params, x), atol=1e-5)
  chex.assert_shape(logits_fn(params, x[0]), (4,))


@pytest.mark.parametrize(
  "vae",
  [models.MLPVAE((10, 10, 1), 4, hidden=(16,)), models.ConvVAE((10, 10, 3), 4, features=(4, 8))],
)
def test_vae_fns_match_batched_apply(key, vae):
  x = _uniform(5, *vae.image_shape)
  params = _params(vae, x, key)
  fns = models.vae_fns(vae)
  mean, logvar = _batched(fns.encode, in_axes=(None, 0))(params, x)
  ref_mean, ref_logvar = jax.jit(functools.partial(vae.apply, method="encode"))(params, x)
  chex.assert_trees_all_close((mean, logvar), (ref_mean, ref_logvar), atol=1e-5)
  z = 2 * _uniform(5, 4) - 1
  decode = jax.jit(functools.partial(vae.apply, method="decode"))
  decoded = _batched(fns.decode, in_axes=(None, 0))(params, z)
  chex.assert_trees_all_close(decoded, jax.nn.sigmoid(decode(params, z)), atol=1e-5)
  assert np.all((decoded >= 0) & (decoded <= 1))
  recon = _batched(fns.reconstruct, in_axes=(None, 0))(params, x)
  chex.assert_trees_all_close(recon, jax.nn.sigmoid(decode(params, ref_mean)), atol=1e-5)


def test_latent_classifier_fn_reads_the_mean(key):
  vae = models.MLPVAE((6, 6, 1), 3, hidden=(8,))
  clf = models.LatentClassifier(4, hidden=(5,))
  x = _uniform(3, 6, 6, 1)
  params = {"vae": _params(vae, x, key), "clf": _params(clf, jnp.zeros((1, 3)))}
  logits_fn = models.latent_classifier_fn(vae, clf)
  mean, _ = jax.jit(functools.partial(vae.apply, method="encode"))(params["vae"], x)
  expected = jax.jit(clf.apply)(params["clf"], mean)
  got = _batched(logits_fn, in_axes=(None, 0))(params, x)
  chex.assert_trees_all_close(got, expected, atol=1e-5)


def test_builders_are_equal_for_equal_modules_so_jit_does_not_retrace(key):
  # Two builds from equal modules are equal and hash alike: a jit taking them as static
  # arguments compiles once.
  f1 = models.classifier_fns(models.CNN(3, features=(4,), dense=(8,)))
  f2 = models.classifier_fns(models.CNN(3, features=(4,), dense=(8,)))
  assert f1 == f2 and hash(f1) == hash(f2)
  assert models.vae_fns(models.MLPVAE((4, 4, 1), 2)) == models.vae_fns(models.MLPVAE((4, 4, 1), 2))
  assert f1 != models.classifier_fns(models.CNN(4, features=(4,), dense=(8,)))

  traces = []

  def apply(fn, params, x):
    traces.append(1)
    return fn(params, x)

  jitted = jax.jit(apply, static_argnums=0)
  x = _uniform(6, 6, 1)
  params = _params(models.CNN(3, features=(4,), dense=(8,)), x[None])
  jitted(f1, params, x)
  jitted(f2, params, x)
  assert len(traces) == 1


def test_param_count_sums_leaves():
  assert models.param_count({"a": jnp.zeros((2, 3)), "b": [jnp.zeros(4), jnp.zeros(())]}) == 11


def test_cnn_standardize_ignores_brightness_and_contrast():
  model = models.CNN(3, features=(4,), dense=(8,), standardize=True)
  x = _uniform(2, 8, 8, 3)
  params = _params(model, x)
  apply = jax.jit(model.apply)
  chex.assert_trees_all_close(apply(params, 0.5 * x + 0.2), apply(params, x), atol=1e-4)
  plain = models.CNN(3, features=(4,), dense=(8,))
  assert not np.allclose(
    jax.jit(plain.apply)(params, 0.5 * x + 0.2), jax.jit(plain.apply)(params, x)
  )


def test_depth_to_space_places_each_channel_group_in_its_subpixel():
  x = _uniform(2, 3, 4, 4 * 5)
  out = np.asarray(models.depth_to_space(x))
  assert out.shape == (2, 6, 8, 5)
  for u in range(2):
    for v in range(2):
      np.testing.assert_array_equal(
        out[:, u::2, v::2, :], x[..., (2 * u + v) * 5 : (2 * u + v + 1) * 5]
      )


def test_the_model_tables_agree_and_build_each_kind():
  """vae_attacks.models.MODEL_KINDS (read by configs and validation) names the rows of
  experiments/models.py's MODELS, with the same kinds; each builds its module from a section."""
  import types  # noqa: PLC0415

  from configs import base  # noqa: PLC0415
  from experiments import models as models_lib  # noqa: PLC0415

  assert {k: v.kind for k, v in models_lib.MODELS.items()} == models.MODEL_KINDS
  assert base.MODELS == tuple(models.MODEL_KINDS)
  from configs import study_genclf  # noqa: PLC0415
  from vae_attacks import genclf  # noqa: PLC0415

  c = study_genclf.add_generative(base.get_config(dataset="mnist", models=base.MODELS, quick=True))
  for variant, name in models.MODEL_VARIANTS.items():  # the MNIST part's (study_genclf.py)
    c.model[variant] = dict(c.model[name])
  data = types.SimpleNamespace(x_train=np.zeros((2, 28, 28, 1)), class_names=tuple("abc"))
  generative = {"abs": genclf.ABSVAE, "cvae": genclf.ConditionalVAE}
  for name, spec in models_lib.MODELS.items():
    module = spec.build(c.model[name], data)
    if name in models.GENERATIVE_CLASSIFIERS:
      want = generative[models.MODEL_VARIANTS.get(name, name)]
    else:
      want = models.CNN if spec.kind == "classifier" else (models.MLPVAE, models.ConvVAE)
    assert isinstance(module, want)
  assert models_lib.MODELS["cnn"].build(c.model.cnn, data).num_classes == 3
