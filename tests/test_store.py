"""The results files: atomic JSON, and a JSONL log that survives a torn write and resumes."""

import json

import pytest

from experiments import store

KEY = ("model", "eps")


def test_json_is_replaced_whole_and_leaves_no_temp_files(tmp_path):
  path = tmp_path / "sub" / "m.json"
  store.write_json_atomic(path, {"a": 1})
  store.write_json_atomic(path, {"a": 2, "b": [1.5]})
  assert json.loads(path.read_text()) == {"a": 2, "b": [1.5]}
  assert [p.name for p in path.parent.iterdir()] == ["m.json"]


def test_log_resumes_and_refuses_duplicates(tmp_path):
  path = tmp_path / "results.jsonl"
  log = store.ResultsLog(path, KEY)
  log.append({"model": "cnn", "eps": 0.1, "rate": 0.5})
  log.append({"model": "cnn", "eps": 0.2, "rate": 0.7})
  again = store.ResultsLog(path, KEY)
  assert again.rows == log.rows
  assert again.has({"model": "cnn", "eps": 0.2})
  assert not again.has({"model": "vae", "eps": 0.2})
  with pytest.raises(ValueError, match="already in"):
    again.append({"model": "cnn", "eps": 0.1, "rate": 0.0})


def test_torn_last_line_is_dropped_and_the_row_can_be_redone(tmp_path):
  path = tmp_path / "results.jsonl"
  log = store.ResultsLog(path, KEY)
  log.append({"model": "cnn", "eps": 0.1, "rate": 0.5})
  with open(path, "ab") as f:  # a kill in the middle of the second write
    f.write(b'{"model": "cnn", "eps": 0.2, "ra')
  log2 = store.ResultsLog(path, KEY)
  assert [r["eps"] for r in log2.rows] == [0.1]
  assert path.read_text().endswith("\n")
  log2.append({"model": "cnn", "eps": 0.2, "rate": 0.7})
  lines = path.read_text().splitlines()
  assert [json.loads(x)["eps"] for x in lines] == [0.1, 0.2]
