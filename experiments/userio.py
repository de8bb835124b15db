"""What `experiments.main` tells the user in one line: the configs it knows, a missing or
unknown config file, an interrupted run, a workdir it cannot write."""

import _thread
import ast
import pathlib
import sys

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
_NOT_RUNNABLE = ("__init__.py", "base.py", "base_defenses.py")


def _args_of(tree: ast.Module) -> tuple[str, ...]:
  """A config file's ARGS (its own, else the base's: '' and 'quick')."""
  for node in tree.body:
    if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "ARGS" for t in node.targets):
      try:
        return tuple(ast.literal_eval(node.value))
      except ValueError:
        break
  return ("", "quick")


def configs() -> list[tuple[str, str, tuple[str, ...]]]:
  """(path, first docstring line, arguments) of every runnable config, read without importing."""
  out = []
  for path in sorted(CONFIG_DIR.glob("*.py")):
    if path.name in _NOT_RUNNABLE:
      continue
    tree = ast.parse(path.read_text())
    doc = (ast.get_docstring(tree) or "").strip().splitlines()
    out.append((f"configs/{path.name}", doc[0] if doc else "", _args_of(tree)))
  return out


def configs_help() -> str:
  """The configs and their arguments, for --help and for a missing or unknown --config."""
  lines = []
  for path, doc, args in configs():
    variants = " ".join(f"{path}:{a}" if a else path for a in args)
    lines.append(f"  {variants}\n      {doc}")
  return "configs (path[:argument]):\n" + "\n".join(lines)


def flag_value(argv, name: str) -> str | None:
  """The value of flag `name` in `argv` (`--name=X` or `--name X`), or None."""
  for i, a in enumerate(argv):
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
    if a == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def config_spec(argv) -> str | None:
  """The value of --config in `argv` (`--config=X` or `--config X`), or None."""
  return flag_value(argv, "config")


def config_file_error(argv) -> str | None:
  """One line when --config is missing or names no file (None when it names one, or on --help)."""
  if any(a in ("--help", "-h", "--helpfull", "--helpshort", "-?") for a in argv):
    return None
  names = ", ".join(p for p, _, _ in configs())
  spec = config_spec(argv)
  if not spec:
    return f"--config is required: one of {names} (append :quick for a short run; see --help)"
  path = spec.partition(":")[0]
  if not pathlib.Path(path).is_file():
    return f"config file {path} not found (from {pathlib.Path.cwd()}); configs: {names}"
  return None


def interrupted(workdir: str) -> str:
  """The one line after Ctrl-C."""
  return (
    f"interrupted: {workdir} keeps every finished checkpoint (one per epoch) and every result row "
    "written so far; rerun the same command to resume from there"
  )


def interrupted_at_start_up(argv) -> str:
  """The one line after Ctrl-C during the imports, JAX's start-up or the config's loading."""
  workdir = flag_value(argv, "workdir")
  kept = f"{workdir} keeps" if workdir else "the workdir keeps"
  return (
    f"interrupted while starting up, before any work: nothing was written; {kept} what earlier "
    "runs saved; rerun the same command to start (or resume) the run"
  )


def os_error(e: OSError, workdir: str) -> str:
  """One line for a workdir (or its parent) that cannot be written, a full disk, ..."""
  where = e.filename or workdir
  what = e.strerror or type(e).__name__
  return (
    f"{what}: {where}; the run needs a writable --workdir (now {workdir}) and parent folder "
    "(and free space)"
  )


def redeliver_interrupt(unraisable, default=sys.unraisablehook) -> None:
  """A KeyboardInterrupt raised inside a callback that cannot raise (jax's garbage-collection
  callback: "Exception ignored in _xla_gc_callback") would be printed and dropped, and the run
  would go on as if Ctrl-C had not been pressed: deliver it again to the main thread."""
  if isinstance(unraisable.exc_value, KeyboardInterrupt):
    _thread.interrupt_main()
    return
  default(unraisable)
