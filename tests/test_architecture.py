"""The package's shape: data flows one way (no import cycles, lazy imports included), and
every list of attacks, defences, datasets and models comes from its table."""

import ast
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("vae_attacks", "experiments", "configs")


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
  """Project modules imported anywhere in the file (module level or inside functions)."""
  out = set()
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      candidates = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base])
        base = base.strip(".")
      candidates = [base] + [f"{base}.{a.name}" for a in node.names]
    else:
      continue
    for c in candidates:
      while c and c not in known:  # a submodule's attribute: its module
        c = c.rpartition(".")[0]
      if c and c != name:
        out.add(c)
  return out


def _graph() -> dict[str, set[str]]:
  mods = _modules()
  known = set(mods)
  graph = {n: _imports(n, p, known) for n, p in mods.items()}
  # A package's __init__ is imported with any of its submodules; a submodule importing its own
  # package's __init__ for re-exports is not a cycle of the data flow.
  return {n: {d for d in deps if not n.startswith(d + ".")} for n, deps in graph.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(n):
    state[n] = 1
    stack.append(n)
    for d in sorted(graph.get(n, ())):
      if state.get(d) == 1:
        return stack[stack.index(d) :] + [d]
      if d not in state and (found := visit(d)):
        return found
    stack.pop()
    state[n] = 2
    return None

  for n in sorted(graph):
    if n not in state and (found := visit(n)):
      return found
  return None


def test_no_module_imports_another_that_imports_it_back():
  cycle = _cycle(_graph())
  assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle():
  graph = _graph()
  graph["vae_attacks.metrics"] = graph["vae_attacks.metrics"] | {"experiments.run"}
  assert _cycle(graph) is not None


def test_the_library_never_imports_the_experiments_layer():
  graph = _graph()
  bad = {n: d for n, deps in graph.items() if n.startswith("vae_attacks") for d in deps
         if d.startswith(("experiments", "configs"))}  # fmt: skip
  assert not bad


@pytest.mark.parametrize("family", ["classifier", "vae"])
def test_configs_validation_and_report_take_the_attack_lists_from_the_registry(family):
  from configs import base
  from experiments import validate
  from vae_attacks.attacks import registry

  c = base.get_config(dataset="mnist", models=("cnn", "mlp_vae"), quick=True)
  enabled = c.attacks.enabled if family == "classifier" else c.attacks.vae.enabled
  assert tuple(enabled) == registry.enabled_by_default(family)
  validate.validate(c)
  # A name that is not in the table is refused by validation, naming the table's entries.
  if family == "classifier":
    c.attacks.enabled = ("fgsm", "no_such_attack")
  else:
    c.attacks.vae.enabled = ("no_such_attack",)
  with pytest.raises(
    validate.ConfigError, match="no_such_attack.*allowed: " + registry.configurable(family)[0]
  ):
    validate.validate(c)


def test_every_registry_attack_has_a_config_section_with_a_valid_norm_and_its_knobs():
  from configs import base
  from vae_attacks.attacks import registry

  optional = [n for n, s in registry.ATTACKS.items() if not s.default_enabled]
  assert sorted(optional) == sorted(base.OPTIONAL_SECTIONS)
  for dataset in ("mnist", "lfw"):
    c = base.get_config(dataset=dataset, models=("cnn",), quick=False)
    base.add_attacks(c, *optional)
    for spec in registry.ATTACKS.values():
      sec = registry.section_of(spec, c.attacks)
      assert registry.norm_of(spec, sec) in spec.norms
      assert registry.eps_grid(spec, sec)
      knobs = registry.knobs_of(spec, sec)
      assert set(knobs) <= set(spec.knobs) | {"key"}


def test_every_attack_grid_on_lfw_is_the_mnist_grid_scaled_by_its_rule():
  """Per attack of the study's design: an L-inf budget is per pixel (LFW_LINF_EPS, or the same
  grid), an L2 budget grows as sqrt(D ratio), an L1 budget as the ratio, a penalty on
  ||d||^2 shrinks by it (`base.scale_section`). Fails for an attack left at MNIST's grid on LFW
  (the VAE FGSM variants were, until 2026-12-05)."""
  from configs import base, study
  from vae_attacks.attacks import registry

  c = study.get_config()
  ratio = (154 * 154 * 3) / (28 * 28)
  for spec in registry.ATTACKS.values():
    if spec.enabled_by is not None:
      continue
    sections = [registry.section_of(spec, c[p].attacks) if (spec.section or spec.name) in
                (c[p].attacks.vae if spec.family == "vae" else c[p].attacks) else None
                for p in ("mnist_vae", "lfw_vae")]  # fmt: skip
    if None in sections:
      continue
    mnist, lfw = (tuple(s["eps"]) for s in sections)
    norm = registry.norm_of(spec, sections[0])
    if spec.name in base.LFW_LINF_EPS:
      want = base.LFW_LINF_EPS[spec.name]
    elif spec.eps_kind == "penalty":
      want = tuple(e / ratio for e in mnist)
    elif norm == "l2":
      want = tuple(e * ratio**0.5 for e in mnist)
    elif norm == "l1":
      want = tuple(e * ratio for e in mnist)
    else:
      want = mnist
    np.testing.assert_allclose(lfw, want, rtol=0.02, err_msg=spec.name)
    if norm == "linf" and spec.eps_kind == "budget" and len(mnist) > 1:
      # An L-inf grid takes the LFW grid (valid at 154x154x3), which meets MNIST's at some eps
      # so that H1 has cells to compare; a single search bound (bim_min) stays per pixel.
      assert spec.name in base.LFW_LINF_EPS and set(lfw) & set(mnist), spec.name
