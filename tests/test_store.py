"""The results files: atomic whole files, a JSONL log that survives a torn write and resumes,
every write checked for a full disk, and versioned rows checked against a schema."""

import errno
import json
import os
import pathlib

import pytest
from test_report import make_row

from experiments import report, store

KEY = ("model", "eps")
RESULT_KEY = ("dataset", "model", "attack", "norm", "eps", "settings")  # run.RESULT_KEY


def test_json_is_replaced_whole_and_leaves_no_temp_files(tmp_path):
  path = tmp_path / "sub" / "m.json"
  store.write_json_atomic(path, {"a": 1})
  store.write_json_atomic(path, {"a": 2, "b": [1.5]})
  assert json.loads(path.read_text()) == {"a": 2, "b": [1.5]}
  assert [p.name for p in path.parent.iterdir()] == ["m.json"]


def test_log_resumes_and_refuses_duplicates(tmp_path):
  path = tmp_path / "results.jsonl"
  log = store.ResultsLog(path, KEY, kinds=None)
  log.append({"model": "cnn", "eps": 0.1, "rate": 0.5})
  log.append({"model": "cnn", "eps": 0.2, "rate": 0.7})
  again = store.ResultsLog(path, KEY, kinds=None)
  assert again.rows == log.rows
  assert all(r["format_version"] == store.FORMAT_VERSION for r in again.rows)
  assert again.has({"model": "cnn", "eps": 0.2})
  assert not again.has({"model": "vae", "eps": 0.2})
  with pytest.raises(ValueError, match="already in"):
    again.append({"model": "cnn", "eps": 0.1, "rate": 0.0})


def test_torn_last_line_is_dropped_and_the_row_can_be_redone(tmp_path):
  path = tmp_path / "results.jsonl"
  log = store.ResultsLog(path, KEY, kinds=None)
  log.append({"model": "cnn", "eps": 0.1, "rate": 0.5})
  with open(path, "ab") as f:  # a kill in the middle of the second write
    f.write(b'{"model": "cnn", "eps": 0.2, "ra')
  log2 = store.ResultsLog(path, KEY, kinds=None)
  assert [r["eps"] for r in log2.rows] == [0.1]
  assert path.read_text().endswith("\n")
  log2.append({"model": "cnn", "eps": 0.2, "rate": 0.7})
  lines = path.read_text().splitlines()
  assert [json.loads(x)["eps"] for x in lines] == [0.1, 0.2]


# ---------------------------------------------------------------------------------------------
# A full disk: every write checks what it wrote.


def _disk_full_after(monkeypatch, budget: int, short: bool = True):
  """os.write as on a disk with `budget` bytes left: short writes until it is full, then
  ENOSPC (or, with short=False, ENOSPC as soon as a write does not fit whole)."""
  real = os.write
  left = [budget]

  def write(fd, data):
    data = bytes(data)
    if left[0] <= 0 or (not short and len(data) > left[0]):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    n = real(fd, data[: left[0]])
    left[0] -= n
    return n

  monkeypatch.setattr(os, "write", write)
  return left


def test_short_writes_are_completed(tmp_path, monkeypatch):
  """os.write may write less than asked: the rest is written, nothing is lost."""
  real = os.write
  monkeypatch.setattr(os, "write", lambda fd, data: real(fd, bytes(data)[:7]))
  path = tmp_path / "results.jsonl"
  store.ResultsLog(path, KEY, kinds=None).append({"model": "cnn", "eps": 0.1, "rate": 0.5})
  store.write_text_atomic(tmp_path / "summary.md", "x" * 100)
  monkeypatch.undo()
  assert store.ResultsLog(path, KEY, kinds=None).rows[0]["rate"] == 0.5
  assert (tmp_path / "summary.md").read_text() == "x" * 100


@pytest.mark.parametrize("short", [True, False])
def test_full_disk_in_the_log_leaves_no_torn_line_and_names_it(tmp_path, monkeypatch, short):
  """A row that does not fit: OutOfSpace naming results.jsonl, the partial line cut off, the
  rows before it intact; after space is freed the same log appends the row."""
  path = tmp_path / "results.jsonl"
  log = store.ResultsLog(path, KEY, kinds=None)
  log.append({"model": "cnn", "eps": 0.1, "rate": 0.5})
  before = path.read_bytes()
  _disk_full_after(monkeypatch, 10, short)
  with pytest.raises(store.OutOfSpace, match=f"out of disk space writing {path}"):
    log.append({"model": "cnn", "eps": 0.2, "rate": 0.7})
  monkeypatch.undo()
  assert path.read_bytes() == before
  assert not log.has({"model": "cnn", "eps": 0.2})
  log.append({"model": "cnn", "eps": 0.2, "rate": 0.7})  # space freed: the rerun's append
  assert [r["eps"] for r in store.ResultsLog(path, KEY, kinds=None).rows] == [0.1, 0.2]


def test_full_disk_in_a_whole_file_keeps_the_old_one(tmp_path, monkeypatch):
  """write_text_atomic, write_with (np.savez, savefig): the old file stays, no temp file."""
  path = tmp_path / "summary.md"
  store.write_text_atomic(path, "old\n")
  _disk_full_after(monkeypatch, 5)
  with pytest.raises(store.OutOfSpace, match=f"writing {path}"):
    store.write_text_atomic(path, "a new summary\n")
  with pytest.raises(store.OutOfSpace, match="fig.png"):
    store.write_with(tmp_path / "fig.png", lambda f: f.write(b"\x89PNG" * 100))
  monkeypatch.undo()
  assert path.read_text() == "old\n"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.md"]


def test_out_of_space_is_recognised_through_library_wrappers():
  """orbax re-raises tensorstore's ENOSPC as a ValueError holding the OS message."""
  orbax = ValueError('RESOURCE_EXHAUSTED: Failed writing: "/w/x": No space left on device')
  assert store.is_out_of_space(orbax)
  assert store.is_out_of_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
  try:
    try:
      raise OSError(errno.ENOSPC, "full")
    except OSError as e:
      raise RuntimeError("wrapped") from e
  except RuntimeError as e:
    assert store.is_out_of_space(e)
  assert not store.is_out_of_space(ValueError("RESOURCE_EXHAUSTED: Out of memory"))


# ---------------------------------------------------------------------------------------------
# Versioned rows and their schema.


def _write_lines(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_rows_of_format_1_are_migrated_in_one_line(tmp_path, caplog):
  """Rows written before rows had a version (results/study/*) are format 1: a log opening
  them says so once and rewrites them in the current format; the report reads them too."""
  rows = [make_row("mnist", "cnn", "fgsm", "linf", e) for e in (0.1, 0.2)]
  path = tmp_path / "results.jsonl"
  _write_lines(path, rows)
  assert [r["eps"] for r in report.read_rows(path)] == [0.1, 0.2]  # read-only: no rewrite
  assert "format_version" not in path.read_text()
  caplog.set_level("WARNING")
  log = store.ResultsLog(path, RESULT_KEY)
  assert [m for m in caplog.messages if "migrated" in m] == [
    "results.jsonl: migrated 2 of format 1 to format 2"
  ]
  assert log.rows == [dict(r, format_version=2) for r in rows]
  assert [json.loads(x) for x in path.read_text().splitlines()] == log.rows
  caplog.clear()
  store.ResultsLog(path, RESULT_KEY)  # once migrated, nothing more to say
  assert not caplog.messages


def test_rows_failing_the_schema_are_set_aside_recomputed_and_never_reported(tmp_path, caplog):
  """A row lacking `validity_rate`, one with it renamed, one of a newer format, and one that is
  not an object: the report never uses them; a log sets them aside in results.jsonl.rejected
  with one line saying how many and why, so a rerun recomputes their points."""
  good = make_row("mnist", "cnn", "fgsm", "linf", 0.1)
  missing = {k: v for k, v in make_row("mnist", "cnn", "fgsm", "linf", 0.2).items()
             if k != "validity_rate"}  # fmt: skip
  renamed = make_row("mnist", "cnn", "fgsm", "linf", 0.3)
  renamed["valid_rate"] = renamed.pop("validity_rate")
  newer = dict(make_row("mnist", "cnn", "bim", "linf", 0.1), format_version=99)
  path = tmp_path / "results.jsonl"
  _write_lines(path, [good, missing, renamed, newer, [1, 2]])
  rejected = []
  assert report.read_rows(path, rejected=rejected) == [dict(good, format_version=2)]
  assert sorted(rejected) == sorted([
    "missing field 'validity_rate'", "missing field 'validity_rate'",
    "format 99 is newer than this code's 2", "not a JSON object (list)",
  ])  # fmt: skip
  caplog.set_level("WARNING")
  log = store.ResultsLog(path, RESULT_KEY)
  assert len(log.rows) == 1 and not log.has(missing) and not log.has(renamed)
  lines = [m for m in caplog.messages if "set aside" in m]
  assert len(lines) == 1 and lines[0].startswith(
    "results.jsonl: 4 rows set aside in results.jsonl.rejected, to be recomputed: "
    "missing field 'validity_rate' (2)"
  )
  aside = [json.loads(x) for x in (tmp_path / "results.jsonl.rejected").read_text().splitlines()]
  assert [a["row"] for a in aside] == [missing, renamed, newer, [1, 2]]  # kept, not lost
  log.append(dict(missing, validity_rate=0.5))  # the rerun's recomputed row
  assert len(store.ResultsLog(path, RESULT_KEY).rows) == 2


def test_a_row_that_breaks_the_schema_is_never_appended(tmp_path):
  log = store.ResultsLog(tmp_path / "results.jsonl", RESULT_KEY)
  row = make_row("mnist", "cnn", "fgsm", "linf", 0.1)
  with pytest.raises(ValueError, match="not a finite number or null"):
    log.append(dict(row, mean_ssim=float("nan")))
  with pytest.raises(ValueError, match="eps' is not a finite number"):
    log.append(dict(row, eps=float("inf")))
  assert not (tmp_path / "results.jsonl").exists() or not (tmp_path / "results.jsonl").read_text()


def test_hand_edited_duplicate_rows_keep_the_last_as_the_report_does(tmp_path, caplog):
  """The extra fault: a results.jsonl edited by hand, or two of them concatenated, repeats a
  key. The log keeps the last row of each key (the one the report shows), sets the others aside
  in one line, and from then on holds each key once."""
  a = make_row("mnist", "cnn", "fgsm", "linf", 0.1, k=3)
  b = make_row("mnist", "cnn", "fgsm", "linf", 0.2)
  a2 = make_row("mnist", "cnn", "fgsm", "linf", 0.1, k=7)
  path = tmp_path / "results.jsonl"
  _write_lines(path, [a, b, a2, b])
  shown, _ = report.select_rows(report.read_rows(path))
  caplog.set_level("WARNING")
  log = store.ResultsLog(path, RESULT_KEY)
  assert log.rows == [dict(r, format_version=2) for r in (a2, b)]
  assert [r["success_rate"] for r in shown] == [r["success_rate"] for r in (a2, b)]
  assert [m for m in caplog.messages if "repeat" in m] == [
    "results.jsonl: 2 rows repeat the key of a later row (a hand edit? two files joined?); kept "
    "the last row of each key, set the others aside in results.jsonl.rejected"
  ]
  assert len(path.read_text().splitlines()) == 2


def test_committed_rows_pass_their_schema_and_later_fields_are_optional_but_typed(tmp_path):
  """The committed records (format 1, before `record`, `validity_rate_psnr`, ... existed) all
  load through the one reader, none rejected; a later field is checked when present."""
  repo = pathlib.Path(__file__).resolve().parent.parent
  for path, kinds in (
    (repo / "results/study_2026-12-01/mnist_vae/results.jsonl", store.RESULTS_KINDS),
    (repo / "results/study_2026-12-01/lfw_vae/results.jsonl", store.RESULTS_KINDS),
    (repo / "results/comm_ae/results.jsonl", store.COMM_KINDS),
  ):
    rejected = []
    rows = store.read_jsonl(path, kinds, rejected)
    assert rows and rejected == [], (path, rejected[:3])
    assert all(r["format_version"] == store.FORMAT_VERSION for r in rows)
  row = make_row("mnist", "cnn", "fgsm", "linf", 0.1)
  later = dict(
    record="records/cnn/x.npz",
    validity_rate_psnr=0.5,
    validity_rate_psnr_ci=[0.4, 0.6],
    effectiveness_psnr={"high": 1, "modal": "high"},
  )
  ok = dict(row, **later)
  bad = dict(row, eps=0.2, validity_rate_psnr="half")
  _write_lines(tmp_path / "results.jsonl", [ok, bad])
  rejected = []
  assert store.read_jsonl(tmp_path / "results.jsonl", store.RESULTS_KINDS, rejected) == [
    dict(ok, format_version=2)
  ]
  assert rejected == ["field 'validity_rate_psnr' is not a finite number or null"]
  # Without kinds: any JSON object, as main's reader did; a torn line and a list are skipped.
  (tmp_path / "any.jsonl").write_text('{"a": 1}\n[1]\n{"b": ')
  assert store.read_jsonl(tmp_path / "any.jsonl") == [{"a": 1, "format_version": 2}]


def test_examples_file_keeps_the_most_leading_examples_that_fit_the_byte_budget(tmp_path):
  import numpy as np  # noqa: PLC0415

  # random float32 does not compress: 8 examples of 64 KB each, a 300 KB budget keeps 4
  x = np.random.default_rng(0).random((8, 128, 128)).astype(np.float32)
  path = tmp_path / "examples" / "e.npz"
  k = store.save_examples_npz(path, 8, lambda k: dict(x=x[:k], label=np.arange(k)), 300_000)
  assert k == 4 and path.stat().st_size <= 300_000
  with np.load(path) as f:
    np.testing.assert_array_equal(f["x"], x[:4])
    np.testing.assert_array_equal(f["label"], np.arange(4))
  # within the budget: every example is kept
  assert store.save_examples_npz(path, 8, lambda k: dict(x=x[:k, :4, :4]), 300_000) == 8
  # one example over the budget: its float32 arrays go to float16, read back as float32
  assert store.save_examples_npz(path, 8, lambda k: dict(x=x[:k], label=np.arange(k)), 50_000) == 1
  assert path.stat().st_size <= 50_000
  with np.load(path) as f:
    assert f["x"].dtype == np.float16 and f["label"].dtype == np.arange(1).dtype
  back = store.load_examples(path)
  assert back["x"].dtype == np.float32
  np.testing.assert_allclose(back["x"], x[:1], atol=2.0**-11)
