"""``benchmarks/bench_peers.py`` without a GPU: its targets, and its errors for a missing
peer or a bad config (the timing itself runs on the device)."""

import importlib
import pathlib

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
  monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports bench_kernels
  return importlib.import_module("bench_peers")


def _row(shape, config, speedup, frac_floor=0.5):
  return dict(shape=list(shape), config=config, speedup=speedup, frac_floor=frac_floor)


def test_targets_apply_to_their_own_rows(bench):
  rows = [_row((1, 4096, 4096), "AOL+4", 1.25), _row((1, 2048, 8192), "AOL+4", 1.19),
          _row((1, 8192, 8192), "AOL+4", 1.3, frac_floor=0.89),
          _row((48, 768, 768), "AOL+4", 1.45), _row((24, 768, 3072), "AOL+4", 1.41),
          _row((1, 4096, 4096), "Frob+5", 0.5),  # no target for Frobenius + 5
          _row((1, 2048, 2048), "AOL+4", 0.9)]  # below 4096: no target
  t = bench.judge(rows)
  assert t["speedup_from_4096"]["passed"] is False
  assert [r[:2] + [r[2]] for r in t["speedup_from_4096"]["rows"]] == [
      ["1x4096x4096", "AOL+4", True], ["1x2048x8192", "AOL+4", False],
      ["1x8192x8192", "AOL+4", True]]
  assert t["speedup_gpt2_stacks"]["passed"] is True
  assert len(t["speedup_gpt2_stacks"]["rows"]) == 2
  assert t["floor_8192"]["passed"] is True
  rows[2]["frac_floor"] = 0.84
  assert bench.judge(rows)["floor_8192"]["passed"] is False
  assert bench.judge(rows[5:])["floor_8192"]["passed"] is None  # not measured


def test_a_missing_peer_says_where_to_get_it(bench, tmp_path):
  with pytest.raises(SystemExit, match="thib-s/flash-newton-schulz.*never commit"):
    bench.load_peer(str(tmp_path))


def test_a_bad_config_names_the_choices(bench):
  assert bench.parse_configs("AOL+4,Frob+5") == ["AOL+4", "Frob+5"]
  with pytest.raises(SystemExit, match=r"--configs: \['AOL\+5'\] not among"):
    bench.parse_configs("AOL+4,AOL+5")
