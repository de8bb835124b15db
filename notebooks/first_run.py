# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---
# %% [markdown]
# # A finished run: CNN vs VAE, and one attack on new pairs
#
# Open with jupytext (`jupytext --to notebook notebooks/first_run.py`) or run as a script:
# `VAE_ATTACKS_RUN=runs/mnist_vae_quick python notebooks/first_run.py` after
# `python -m experiments.main --config=configs/mnist_vae.py:quick --workdir=runs/mnist_vae_quick`.
# `tests/test_newcomer.py` executes it on a tiny finished run.

# %%
import os
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.load import load_run  # noqa: E402
from vae_attacks.attacks import bim, runner  # noqa: E402

run = load_run(os.environ.get("VAE_ATTACKS_RUN", "runs/mnist_vae_quick"))
print({name: round(m["test_accuracy"], 4) for name, m in run.train_metrics.items()})

# %% [markdown]
# ## CNN vs VAE: success rate of the targeted L-inf BIM against eps, from `results.jsonl`

# %%
fig, ax = plt.subplots(figsize=(5, 3.5))
for model in run.config.models:
  rows = sorted(
    (r for r in run.rows if r["model"] == model and r["attack"] == "bim"), key=lambda r: r["eps"]
  )
  if rows:
    n = rows[0]["n_pairs"]
    ax.plot([r["eps"] for r in rows], [r["success_rate"] for r in rows], "o-",
            label=f"{model} ({n} pairs)")  # fmt: skip
ax.set(xlabel="eps (L-inf, pixel units in [0, 1])", ylabel="success rate", ylim=(-0.05, 1.05))
ax.set_title(f"{run.data.name}: BIM L-inf, CNN vs VAE as classifier")
ax.legend()
out = pathlib.Path(os.environ.get("VAE_ATTACKS_NOTEBOOK_OUT", run.workdir / "figures"))
out.mkdir(parents=True, exist_ok=True)
fig.savefig(out / "notebook_cnn_vs_vae.png", dpi=80)

# %% [markdown]
# ## One attack on new pairs: the last 8 test images, each towards the next class

# %%
x = run.data.x_test[-8:]
target = (run.data.y_test[-8:] + 1) % len(run.data.class_names)
for name in run.config.models:
  model = run.models[name]
  result = runner.run_attack(
    bim.bim, model.logits_fn, model.params, x, target, eps_grid=(0.1, 0.3),
    steps=10, step_size=runner.EpsScaled(2.5 / 10), norm="linf", progress=False,
  )  # fmt: skip
  print(name, "success at eps 0.1 / 0.3:", np.asarray(result.success).mean(axis=1))
