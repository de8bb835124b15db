"""The defence tables of a dataset (rows of experiments/defenses.py's defenses.jsonl)."""

from collections.abc import Mapping, Sequence

import numpy as np

from experiments.report.rows import num
from experiments.report.tables import DASH, fmt_ci, fmt_int, fmt_num, fmt_rate, table
from vae_attacks import metrics

ROBUST_ACCURACY_TEXT = (
  "Robust accuracy: the adversarial input is classified correctly (and accepted, for a "
  "defence that rejects); an example counts as broken when any restart breaks it. "
  "*Worst case* counts an example as robust only if no attack at that eps broke it "
  "(per example, over every attack run: those that know the defence and those that do "
  "not, since a blind attack that breaks an example has broken it all the same); "
  "*lowest single attack* is the lowest robust accuracy of one attack that knows the "
  "defence (white-box on the weights, or adaptive to the defence's mechanism). For a "
  "defence that rejects, robust accuracy counts a rejected input as a loss; the "
  "*worst-case defended* rate counts it as a win (correct or rejected under every attack: "
  "no attack got a misclassified input past it). A defence with no attack that knows it "
  "gets no robustness figure. Intervals: 95% Wilson."
)


def _rate_ci(row: Mapping, field: str) -> str:
  """'0.912 [0.893, 0.928]' for a rate field with its `_ci`, or a dash."""
  if num(row.get(field)) is None:
    return DASH
  return f"{fmt_rate(row.get(field))} {fmt_ci(row.get(f'{field}_ci'))}"


def _per_example_worst(attacked: Sequence[Mapping]) -> dict:
  """(defence, eps) -> {"robust_accuracy", "robust_accuracy_ci", "attacks"}: an example is
  robust only if no attack broke it, from the rows' `not_robust_examples`; for a defence that
  rejects also "defended_rate" (and its `_ci`): correct or rejected under every attack, from
  the rows' `broken_examples` (misclassified and accepted). Left out where a row lacks the
  field (rows of an older run) or the rows disagree on n."""
  groups: dict = {}
  for r in attacked:
    groups.setdefault((r.get("defense"), num(r.get("eps"))), []).append(r)
  out = {}
  for k, rs in groups.items():
    ns = {r.get("n") for r in rs}
    if any(r.get("not_robust_examples") is None for r in rs) or len(ns) != 1:
      continue
    n = int(ns.pop())

    def unbroken(field, rs=rs, n=n):  # (rate, lo, hi) of the examples no row lists
      hit = np.zeros(n, bool)
      for r in rs:
        hit[np.asarray(r[field], int)] = True
      return metrics.success_rate(~hit)

    rate, lo, hi = unbroken("not_robust_examples")
    out[k] = {"robust_accuracy": rate, "robust_accuracy_ci": [lo, hi], "attacks": len(rs)}
    if all(r.get("broken_examples") is not None for r in rs):  # a defence that rejects
      rate, lo, hi = unbroken("broken_examples")
      out[k].update(defended_rate=rate, defended_rate_ci=[lo, hi])
  return out


def _worst_case_table(attacked: Sequence[Mapping]) -> str:
  """Per (defence, eps): clean accuracy, the per-example worst case, the lowest single
  adaptive attack (and, for a defence that rejects, the worst-case defended rate)."""
  union = _per_example_worst(attacked)
  any_rejecting = any("defended_rate" in u for u in union.values())
  worst = {}
  for r in attacked:
    if r.get("adaptive"):
      k = (r.get("defense"), num(r.get("eps")))
      if k not in worst or (num(r.get("robust_accuracy")) or 0.0) < (
        num(worst[k].get("robust_accuracy")) or 0.0
      ):
        worst[k] = r
  keys = list(dict.fromkeys((r.get("defense"), num(r.get("eps"))) for r in attacked))
  lines = []
  for k in keys:
    w = worst.get(k)
    any_row = next(r for r in attacked if (r.get("defense"), num(r.get("eps"))) == k)
    no_adaptive = f"{DASH} (no adaptive attack)"
    u = union.get(k)
    line = [
      k[0],
      fmt_num(k[1]),
      _rate_ci(any_row, "clean_accuracy"),
      (_rate_ci(u, "robust_accuracy") if u else DASH) if w else no_adaptive,
      _rate_ci(w, "robust_accuracy") if w else no_adaptive,
      w.get("attack", DASH) if w else DASH,
    ]
    if any_rejecting:
      line.append((_rate_ci(u, "defended_rate") if u else DASH) if w else no_adaptive)
      # The rows of this (defence, eps) that have it (rows written before it was recorded
      # do not); a dash for a defence that does not reject.
      have = [r for r in attacked if (r.get("defense"), num(r.get("eps"))) == k
              and num(r.get("clean_accuracy_without_rejection")) is not None]  # fmt: skip
      line.append(_rate_ci(have[0], "clean_accuracy_without_rejection") if have else DASH)
    lines.append([*line, fmt_int((w or any_row).get("n"))])
  header = ["defence", "eps (L-inf)", "clean accuracy", "worst-case robust accuracy",
            "lowest single attack", "by attack"]  # fmt: skip
  if any_rejecting:
    header.append("worst-case defended (correct or rejected)")
    header.append("clean accuracy, rejection aside")
  header.append("n")
  return table(header, lines)


def _every_attack_table(attacked: Sequence[Mapping]) -> str:
  """One line per (defence, attack, eps) row, with rejection and impersonation rates where
  any row has them."""
  rejecting = any(num(r.get("false_rejection_rate")) is not None for r in attacked)
  header = ["defence", "attack", "knows the defence", "eps", "n", "restarts x steps",
            "clean accuracy", "robust accuracy"]  # fmt: skip
  if rejecting:
    header += ["detection rate", "false-rejection rate", "defended (correct or rejected)"]
  impersonating = any(num(r.get("impersonation_rate")) is not None for r in attacked)
  if impersonating:
    header += ["impersonation rate"]
  lines = []
  for r in attacked:
    line = [
      r.get("defense"),
      r.get("attack"),
      "yes" if r.get("adaptive") else "no",
      fmt_num(r.get("eps")),
      fmt_int(r.get("n")),
      f"{fmt_int(r.get('restarts'))} x {fmt_int(r.get('steps'))}",
      _rate_ci(r, "clean_accuracy"),
      _rate_ci(r, "robust_accuracy"),
    ]
    if rejecting:
      line += [_rate_ci(r, f) for f in ("detection_rate", "false_rejection_rate",
                                        "defended_rate")]  # fmt: skip
    if impersonating:
      line.append(_rate_ci(r, "impersonation_rate"))
    lines.append(line)
  return table(header, lines)


def _transfer_part(moved: Sequence[Mapping]) -> list[str]:
  """The black-box transfer matrix: accuracy of each target on each source's examples."""
  sources = list(dict.fromkeys(r.get("source") for r in moved))
  targets = list(dict.fromkeys(r.get("target") for r in moved))
  cell = {(r.get("source"), r.get("target")): r for r in moved}
  lines = []
  for s in sources:
    line = [f"{s} ({cell[next((s, t) for t in targets if (s, t) in cell)].get('crafted_with')})"]
    for t in targets:
      r = cell.get((s, t))
      text = _rate_ci(r, "robust_accuracy") if r else DASH
      line.append(f"**{text}**" if s == t else text)
    lines.append(line)
  eps = fmt_num(moved[0].get("eps"))
  n = fmt_int(moved[0].get("n"))
  return [
    "",
    f"**Black-box transfer** (L-inf eps {eps}, n = {n}): accuracy of each target (column) "
    "on the adversarial examples crafted on each source (row); the diagonal (bold) is the "
    "white-box result, the rest what an attacker without the target's gradients achieves.",
    "",
    table(["source \\ target", *targets], lines),
  ]


MASKING_TEXT = (
  'Gradient-masking checks (Carlini et al. 2019, "On Evaluating Adversarial Robustness"; '
  "`vae_attacks.robustness`), on the per-example worst case (the defended rate for a defence "
  "that rejects: the attack's success is a misclassified input that gets through): it falls "
  "as eps grows and is about 0 at an eps that can erase the image (0.5, when the grid has "
  "it); more restarts change it little (in every restarted attack's row the last restart "
  "lowered it by at most 0.01; the table shows the row where it lowered it most); black-box "
  "transfer (the best source) is no stronger than the white-box worst case, and FGSM no "
  "stronger than PGD. A defence failing any check is **flagged**: its robustness figures are "
  "upper bounds from an attack that did not find the gradient's way."
)


def _masking_checks(attacked: Sequence[Mapping], moved: Sequence[Mapping]) -> dict:
  """defence -> [robustness.Check] from the rows (only the checks the rows can decide)."""
  from vae_attacks import robustness  # noqa: PLC0415

  union = _per_example_worst(attacked)
  out: dict = {}
  for name in dict.fromkeys(r.get("defense") for r in attacked):
    rows = [r for r in attacked if r.get("defense") == name]
    worst = {e: u for (d, e), u in union.items() if d == name}
    rejecting = any("defended_rate" in u for u in worst.values())
    field = "defended_rate" if rejecting else "robust_accuracy"
    checks = []
    eps = sorted(e for e in worst if num(worst[e].get(field)) is not None)
    if eps:
      checks.append(robustness.check_falls_with_eps(eps, [worst[e][field] for e in eps]))
    restarted = [r for r in rows if len(r.get("unbroken_by_restart") or []) >= 2]
    if restarted:  # the row whose last restart still lowered its worst case most
      r = max(restarted, key=lambda r: r["unbroken_by_restart"][-2] - r["unbroken_by_restart"][-1])
      curve = r["unbroken_by_restart"]
      checks.append(robustness.check_more_effort_changes_little(
        list(range(1, len(curve) + 1)), curve, what="restarts"))  # fmt: skip
    into = [m for m in moved if m.get("target") == name and m.get("source") != name]
    t_eps = num(into[0].get("eps")) if into else None
    if into and t_eps in worst and num(worst[t_eps].get("robust_accuracy")) is not None:
      best = min(num(m.get("robust_accuracy")) for m in into)
      checks.append(robustness.check_weaker([worst[t_eps]["robust_accuracy"]], [best],
                                            name="transfer_weaker", eps=[t_eps]))  # fmt: skip
    by = {(r.get("attack"), num(r.get("eps"))): r for r in rows}
    both = sorted(e for (a, e) in by if a == "fgsm" and ("pgd", e) in by)
    if both:
      checks.append(robustness.check_weaker(
        [by[("pgd", e)]["robust_accuracy"] for e in both],
        [by[("fgsm", e)]["robust_accuracy"] for e in both],
        name="single_step_weaker", eps=both))  # fmt: skip
    out[name] = checks
  return out


def _masking_part(attacked: Sequence[Mapping], moved: Sequence[Mapping]) -> list[str]:
  """The checks' table, one line per (defence, check), and the flagged defences."""
  checks = _masking_checks(attacked, moved)
  lines = []
  for name, cs in checks.items():
    for c in cs:
      verdict = {True: "passed", False: "**failed**", None: "undecided"}[c.passed]
      lines.append([name, c.name, verdict, c.note])
  if not lines:
    return []
  from vae_attacks import robustness  # noqa: PLC0415

  flagged = [n for n, cs in checks.items() if robustness.flagged(cs)]
  verdict = ("Flagged (a check failed): " + ", ".join(f"**{n}**" for n in flagged) + "."
             if flagged else "No defence failed a check.")  # fmt: skip
  return ["", "**Gradient-masking checks**", "", MASKING_TEXT, "",
          table(["defence", "check", "result", "what it saw"], lines), "", verdict]  # fmt: skip


def defense_markdown(rows: Sequence[Mapping]) -> str:
  """The defence tables of one dataset: worst case over adaptive attacks, every attack, and
  the black-box transfer matrix (rows of experiments/defenses.py)."""
  attacked = [r for r in rows if r.get("kind") == "defense"]
  order = {n: i for i, n in enumerate(dict.fromkeys(r.get("defense") for r in attacked))}
  attacked.sort(key=lambda r: (order[r.get("defense")], num(r.get("eps")) or 0.0))
  parts = ["### Defences", ""]
  if attacked:
    parts += [ROBUST_ACCURACY_TEXT, ""]
    parts += ["**Worst case over the attacks**", "", _worst_case_table(attacked)]
    parts += ["", "**Every attack**", "", _every_attack_table(attacked)]
    notes = list(dict.fromkeys(f"`{r.get('defense')}` / `{r.get('attack')}`: {r.get('note')}"
                               for r in attacked if r.get("note")))  # fmt: skip
    if notes:
      parts += ["", "Attacks: " + "; ".join(notes) + "."]
  moved = [r for r in rows if r.get("kind") == "transfer"]
  if moved:
    parts += _transfer_part(moved)
  if attacked:
    parts += _masking_part(attacked, moved)
  return "\n".join(parts)
