"""``benchmarks/bench_xla_ns.py`` on the CPU: its rows, and its ``--shapes`` option."""

import importlib
import json
import math
import pathlib
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
  monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports bench_kernels
  return importlib.import_module("bench_xla_ns")


def test_rows_name_both_paths_with_times_and_distances(bench, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(sys, "argv", ["bench_xla_ns.py", "--out", str(tmp_path), "--variants",
                                    "bf16_all,fold,fold_scan",
                                    "--shapes", "2x16x48,24x24"])
  bench.main()
  rows = json.loads((tmp_path / "bench_xla_ns.json").read_text())["rows"]
  assert [(r["shape"], r["config"]) for r in rows] == [
      ([2, 16, 48], "AOL+4"), ([2, 16, 48], "Frob+5"), ([1, 24, 24], "AOL+4"),
      ([1, 24, 24], "Frob+5")]
  for r in rows:
    for key in ("optax", "ours", "bf16_all", "fold", "fold_scan"):
      assert r[key + "_ms"] > 0 and math.isfinite(r[key + "_err"]), (key, r)
      assert r[key + "_err"] < 0.1, (key, r)  # each is the same iteration, in bf16
  assert "| 2x16x48 | AOL+4 |" in capsys.readouterr().out


def test_an_unknown_variant_names_the_choices(bench, monkeypatch):
  monkeypatch.setattr(sys, "argv", ["bench_xla_ns.py", "--variants", "fold,unrolled"])
  with pytest.raises(SystemExit, match="--variants: unrolled unknown; choose from astype"):
    bench.main()


@pytest.mark.parametrize("text", ["16", "0x16", "16xq", "1x2x3x4"])
def test_a_bad_shape_names_the_form(bench, text):
  with pytest.raises(SystemExit, match=f"--shapes: '{text}' is not MxN or BxMxN"):
    bench.bk.parse_shapes(text)
