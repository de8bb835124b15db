"""The package's shape: data flows one way (no import cycles, lazy imports included), and
every list of attacks, defences, datasets and models comes from its table."""

import ast
import pathlib

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
