"""Short aliases used across the library (the optax habit)."""

from collections.abc import Callable
from typing import Any

import chex

Array = chex.Array
PRNGKey = chex.PRNGKey
Params = Any  # a Flax variables pytree

# A model seen by an attack: a pure function of (params, one example).
LogitsFn = Callable[[Params, Array], Array]  # (params, x[H, W, C]) -> logits[K]
EncodeFn = Callable[[Params, Array], tuple[Array, Array]]  # x -> (mean[D], logvar[D])
DecodeFn = Callable[[Params, Array], Array]  # z[D] -> x[H, W, C] in [0, 1]
ReconstructFn = Callable[[Params, Array], Array]  # x -> decode(mean(x))
