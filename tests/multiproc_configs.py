"""Tiny configs of the multi-process tests (tests/test_multiproc.py), given to
`python -m experiments.main --config=tests/multiproc_configs.py:<arg>`:

- "attacks": the MNIST CNN (one short epoch) under FGSM, BIM and L-BFGS (the runner's two
  strategies: a compiled vmap, and L-BFGS's host loop), 6 pairs in chunks of 2;
- "defenses": the undefended CNN under FGSM and PGD with 2 restarts, 8 examples;
- "both" (the default): the two as the parts of one study run (workdir/attacks,
  workdir/defenses).

distributed=True; the data folder (`data.dir` of each part), the cluster's address, size and
process id (`cluster.*`) come from the command line.
"""

import ml_collections

from configs import base, mnist_cnn, mnist_defenses

ARGS = ("both", "attacks", "defenses")


def get_config(arg=None):
  arg = arg or "both"
  if arg not in ARGS:
    raise ValueError(f"config argument {arg!r}; allowed: {', '.join(ARGS)}")
  if arg == "both":
    c = ml_collections.ConfigDict()
    c.name = "multiproc"
    c.runs = ("attacks", "defenses")
    c.attacks, c.defenses = get_config("attacks"), get_config("defenses")
    c.distributed = True
    c.cluster = base.cluster_config()
    return c
  c = (mnist_cnn if arg == "attacks" else mnist_defenses).get_config("quick")
  for t in c.train.values():
    t.epochs = 1
    t.batch_size = 64
  c.attacks.num_pairs = 6
  c.attacks.only_correct = False
  c.attacks.chunk_size = 2  # several chunks to deal out, the same on any number of processes
  c.attacks.enabled = ("fgsm", "bim", "lbfgs")
  c.attacks.bim.steps = 2
  c.attacks.bim.eps = (0.1, 0.3)
  c.attacks.lbfgs.max_iters = 3
  c.attacks.lbfgs.search_steps = 2
  c.attacks.lbfgs.c_search = False
  c.output.num_examples = 2
  if arg == "defenses":
    d = c.defenses
    d.enabled = ("none",)
    d.num_examples = 8
    d.attacks.update(eps=(0.1, 0.3), fgsm=True, pgd_steps=2, restarts=2)
    d.transfer.enabled = False
  c.distributed = True
  return c
