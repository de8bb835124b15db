"""The peer implementations that benchmarks/attacks.py sets against the runner, each at its best.

Optional packages (benchmarks/requirements.txt): foolbox 3.3.x (JAX backend through eagerpy)
and cleverhans 4 (its JAX module). Neither needs TensorFlow or PyTorch for what is used here;
`imported_frameworks()` says what got imported. Every peer sees the same model function, the
same parameters and pairs, the same batch and `jax.jit`:

- cleverhans 4 `jax.attacks.projected_gradient_descent` (rand_init off: BIM), wrapped whole in
  `jax.jit` (its Python loop over steps is unrolled by the trace). Written for jax 0.2: two
  shims let it import and run on this jax (`jax.experimental.stax.logsoftmax` is
  `jax.nn.log_softmax`; `jnp.clip(a_min=, a_max=)` became `jnp.clip(min=, max=)`); neither
  changes what it computes.
- foolbox 3.3 `LinfBasicIterativeAttack` on a `JAXModel`: as documented (an eager loop of
  eagerpy steps around a jitted model), and the whole `attack.run` traced into one `jax.jit`
  (its input-bounds check, a host-side `.item()`, is done once before the jit). The faster of
  the two is its best.
- scipy's `minimize(method="L-BFGS-B")` (the same Fortran-derived L-BFGS-B code as
  `fmin_l_bfgs_b`) per pair, with a value_and_grad jitted once and float64 only at the
  boundary, and the solver's stop rules: memory, iteration and evaluation caps, the
  projected-gradient tolerance (scipy's `gtol` is the same max-norm), and the relative
  decrease over `ftol_iters` iterations (a callback; scipy's own one-iteration `ftol` is off).
"""

import sys
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize


def imported_frameworks() -> list[str]:
  """The deep-learning frameworks other than jax that this process has imported."""
  return [m for m in ("tensorflow", "torch") if m in sys.modules]


class _ClipCompat(types.ModuleType):
  """jax.numpy with the pre-0.4.27 `clip(a, a_min=, a_max=)` keywords cleverhans 4 calls."""

  def __getattr__(self, name):
    return getattr(jnp, name)

  @staticmethod
  def clip(a, a_min=None, a_max=None):
    return jnp.clip(a, a_min, a_max)


def cleverhans_pgd() -> Callable:
  """cleverhans 4's JAX `projected_gradient_descent`, importable on this jax."""
  if "jax.experimental.stax" not in sys.modules:
    stax = types.ModuleType("jax.experimental.stax")
    stax.logsoftmax = jax.nn.log_softmax
    sys.modules["jax.experimental.stax"] = stax
  from cleverhans.jax.attacks.projected_gradient_descent import projected_gradient_descent

  for name in (
    "cleverhans.jax.utils",
    "cleverhans.jax.attacks.fast_gradient_method",
    "cleverhans.jax.attacks.projected_gradient_descent",
  ):
    sys.modules[name].np = _ClipCompat("jax.numpy")
  return projected_gradient_descent


def cleverhans_bim(batch_logits, num_classes, *, eps, step_size, steps, jit_kwargs=None):
  """(params, x[B, H, W, C], target[B]) -> x_adv, cleverhans' targeted L-inf BIM, jitted whole.

  `batch_logits(params, x[B, ...]) -> logits[B, K]`; `jit_kwargs` (e.g. shardings) go to jax.jit.
  """
  pgd = cleverhans_pgd()

  def run(params, x, target):
    return pgd(
      lambda xb: batch_logits(params, xb), x, eps, step_size, steps, np.inf,
      clip_min=0.0, clip_max=1.0, y=jax.nn.one_hot(target, num_classes), targeted=True,
    )  # fmt: skip

  return jax.jit(run, **(jit_kwargs or {}))


def foolbox_bim(batch_logits, params, *, eps, step_size, steps):
  """{'eager': fn, 'jit': fn}: foolbox's targeted L-inf BIM, each fn(x, target) -> x_adv.

  'eager' is foolbox as documented: a `JAXModel` of the jitted model, the attack's loop run
  eagerly; 'jit' traces the whole attack into one jitted function of (params, x, target).
  """
  import foolbox
  import foolbox.attacks.gradient_descent_base as gdb

  attack = foolbox.attacks.LinfBasicIterativeAttack(
    abs_stepsize=step_size, steps=steps, random_start=False
  )
  model = foolbox.JAXModel(jax.jit(lambda xb: batch_logits(params, xb)), bounds=(0, 1))

  def eager(x, target):
    return attack.run(model, x, foolbox.criteria.TargetedMisclassification(target), epsilon=eps)

  def traced(params, x, target):
    inner = foolbox.JAXModel(lambda xb: batch_logits(params, xb), bounds=(0, 1))
    check = gdb.verify_input_bounds
    gdb.verify_input_bounds = lambda *_: None  # a host-side .item(): done before the jit
    try:
      return attack.run(inner, x, foolbox.criteria.TargetedMisclassification(target), epsilon=eps)
    finally:
      gdb.verify_input_bounds = check

  whole = jax.jit(traced)

  def jit(x, target):
    if float(jnp.min(x)) < 0.0 or float(jnp.max(x)) > 1.0:
      raise ValueError("inputs outside the model's bounds [0, 1]")
    return whole(params, x, target)

  return {"eager": eager, "jit": jit}


def scipy_lbfgs(value_and_grad, x0, *, memory, max_iters, max_evals, tol, ftol, ftol_iters):
  """One box problem on [0, 1] with scipy's L-BFGS-B under the solver's stop rules.

  Args:
    value_and_grad: z[x0.shape] float32 -> (value, grad), jitted once by the caller.
    x0: the starting point (numpy, float32).
    memory, max_iters, max_evals, tol, ftol, ftol_iters: as `lbfgs.make_config`; the decrease
      rule stops when the last `ftol_iters` iterations lowered f by <= ftol * max(|f|, 1).

  Returns:
    (final objective, iterations, evaluations).
  """
  shape = x0.shape

  def fun(z):
    v, g = value_and_grad(z.reshape(shape).astype(np.float32))
    return float(v), np.asarray(g, np.float64).ravel()

  z0 = np.asarray(x0, np.float64).ravel()
  history = [fun(z0)[0]]

  def decrease_rule(intermediate_result):
    history.append(float(intermediate_result.fun))
    f_back = history[max(len(history) - 1 - ftol_iters, 0)]
    f_new = history[-1]
    if f_back - f_new <= ftol * max(abs(f_back), abs(f_new), 1.0):
      raise StopIteration

  res = scipy.optimize.minimize(
    fun, z0, jac=True, method="L-BFGS-B", bounds=scipy.optimize.Bounds(0.0, 1.0),
    callback=decrease_rule,
    options=dict(maxcor=memory, maxiter=max_iters, maxfun=max_evals, gtol=tol, ftol=0.0),
  )  # fmt: skip
  return float(res.fun), int(res.nit), int(res.nfev) + 1
