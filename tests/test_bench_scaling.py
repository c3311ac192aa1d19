"""benchmarks/bench_scaling.py on fake CPU devices: one process with 4 devices, N in
{1, 2, 4}, every optimizer and layout; then a job of 2 processes with 2 devices each.

The device count must be set before JAX starts, so the benchmark runs in subprocesses.
Float32 compute (``--dtype float32``) makes every layout of one optimizer reach the same
loss to float32 rounding; XLA's CPU backend optimisation level changes no result beyond
that and halves the compile time, which is most of the run.
"""

import importlib
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from _mp import launch

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SCRIPT = BENCHMARKS / "bench_scaling.py"
FAST_COMPILE = "--xla_backend_optimization_level=0"
SEQ, PER_DEVICE_BATCH = 16, 2
TINY = ["--preset", "tiny", "--num-layers", "1", "--seq", str(SEQ), "--per-device-batch",
        str(PER_DEVICE_BATCH), "--rounds", "1", "--steps", "1", "--dtype", "float32"]
#: One plain-jit optimizer and both strategies of one distributed one: the others run
#: through the same code (optax.contrib.muon as optax.adamw, turbo_muon as muon), and the
#: suite's time budget leaves room for these only.
OPTIMIZERS = [("optax.adamw", None), ("muon", "gather_whole"), ("muon", "auto")]
ROW_KEYS = {"n", "layout", "data", "fsdp", "optimizer", "strategy", "global_batch",
            "tokens_per_step", "compile_s", "update_compile_s", "peak_mem_gb",
            "ms_per_step", "round_ms", "tokens_per_s", "mfu", "scaling_efficiency",
            "update_ms", "update_round_ms", "update_speedup", "step_bytes",
            "update_bytes", "first_loss", "loss_after_one_step", "last_loss", "error",
            "skipped"}
BYTES_KEYS = {"all-gather", "all-to-all", "reduce-scatter", "all-reduce",
              "collective-permute", "total", "count", "unknown_trip_loops"}
POSITIVE = ("ms_per_step", "tokens_per_s", "mfu", "scaling_efficiency", "update_ms",
            "update_speedup", "compile_s", "update_compile_s", "peak_mem_gb",
            "first_loss", "loss_after_one_step", "last_loss")
#: Float32 rounding of a loss near 6 (one ulp is 4.8e-7), with room for different
#: reduction orders.
LOSS_RTOL = 2e-6

SKIP_MP = launch.skip_reason()


@pytest.fixture
def bench(monkeypatch):
  monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import their siblings
  return importlib.import_module("bench_scaling")


def _cpu_env(devices: int) -> dict:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get(
      "PYTHONPATH", "").split(os.pathsep) if p])
  return env


def _check_row(r: dict, by_key: dict) -> None:
  """Schema, finite positive figures and the derived ones recomputed from the row."""
  assert set(r) == ROW_KEYS, r
  assert r["error"] is None and r["skipped"] is None, r
  n = r["n"]
  assert r["data"] * r["fsdp"] == n and r["global_batch"] == PER_DEVICE_BATCH * n, r
  assert r["tokens_per_step"] == PER_DEVICE_BATCH * n * SEQ, r
  for key in POSITIVE:
    assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (key, r)
  assert r["round_ms"] == [r["ms_per_step"]] and r["update_round_ms"] == [r["update_ms"]]
  assert set(r["step_bytes"]) == BYTES_KEYS and set(r["update_bytes"]) == BYTES_KEYS, r
  assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["ms_per_step"] * 1e3)
  base = by_key[(1, "dp", r["optimizer"], r["strategy"])]
  assert r["scaling_efficiency"] == pytest.approx(
      r["tokens_per_s"] / (n * base["tokens_per_s"]))
  assert r["update_speedup"] == pytest.approx(base["update_ms"] / r["update_ms"])
  # One step of every optimizer at its default learning rate lowers the loss.
  assert r["loss_after_one_step"] < r["first_loss"], r


def _expects_update_bytes(r: dict) -> bool:
  """Whether the optimizer step alone must move bytes: whole matrices are gathered
  (``gather_whole``), or the state is sharded and the optimizer is not elementwise."""
  if r["n"] == 1:
    return False
  return r["strategy"] == "gather_whole" or (r["layout"] == "dp_fsdp"
                                             and r["optimizer"] != "optax.adamw")


@pytest.mark.slow
def test_every_configuration_on_four_fake_devices(tmp_path):
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), *TINY, "--sizes", "4", "1", "--compile-workers",
       "2", "--kind-name", "cpu-x4", "--out", str(tmp_path), "--optimizers",
       *[name if strategy is None else f"{name}/{strategy}" for name, strategy in OPTIMIZERS]],
      env=_cpu_env(4), cwd=str(ROOT), capture_output=True, text=True, timeout=900,
      check=False)
  assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
  result = json.loads((tmp_path / "bench_scaling_cpu-x4.json").read_text())
  meta, rows = result["meta"], result["rows"]
  assert meta["status"] == "done" and meta["sizes"] == [1, 4]  # given out of order
  assert (meta["backend"], meta["num_devices"], meta["process_count"]) == ("cpu", 4, 1)
  assert meta["jax"] == jax.__version__ and "--kind-name cpu-x4" in meta["command"]
  assert meta["device"] and meta["date"] and meta["peak_tflops"] == 989.0
  assert meta["num_params"] > 0 and meta["model"]["num_layers"] == 1

  expected = [(1, "dp", 1, 1), (4, "dp", 4, 1), (4, "dp_fsdp", 2, 2)]
  assert [(r["n"], r["layout"], r["data"], r["fsdp"], r["optimizer"], r["strategy"])
          for r in rows] == [(*cfg, *opt) for cfg in expected for opt in OPTIMIZERS]
  by_key = {(r["n"], r["layout"], r["optimizer"], r["strategy"]): r for r in rows}
  for r in rows:
    _check_row(r, by_key)
    assert r["mfu"] == pytest.approx(6 * meta["num_params"] * r["tokens_per_s"]
                                     / (r["n"] * 989e12))

  for n in (1, 4):
    at_n = [r for r in rows if r["n"] == n]
    # Same parameters and batch: the same first loss everywhere.
    first = at_n[0]["first_loss"]
    assert all(r["first_loss"] == pytest.approx(first, rel=LOSS_RTOL) for r in at_n)
    for name, _ in OPTIMIZERS:
      # One optimizer, every layout and strategy: the same step.
      losses = [r["loss_after_one_step"] for r in at_n if r["optimizer"] == name]
      assert len(losses) == (1 if n == 1 else 2) * (2 if name in ("muon", "turbo_muon")
                                                    else 1)
      assert max(losses) - min(losses) <= LOSS_RTOL * abs(losses[0]), (n, name, losses)
    for r in at_n:
      step, update = r["step_bytes"], r["update_bytes"]
      if n == 1:
        assert step["total"] == 0 and update["total"] == 0, r
        continue
      assert step["total"] > 0 and step["count"] > 0, r
      if r["layout"] == "dp":
        assert step["all-reduce"] > 0, r  # the gradients
      assert (update["total"] > 0) == _expects_update_bytes(r), r
      if r["strategy"] == "gather_whole":
        assert (update["all-to-all"] > 0) == (r["fsdp"] > 1), r
        assert (update["all-gather"] > 0) == (r["data"] > 1), r

  md = (tmp_path / "bench_scaling_cpu-x4.md").read_text()
  assert proc.stdout.rstrip().endswith(md.strip())  # the table is printed last
  for r in rows:
    strategy = r["strategy"] or "–"
    assert re.search(rf"^\| {r['n']} \| {r['data']} x {r['fsdp']} \| "
                     rf"{re.escape(r['optimizer'])} \| {strategy} \| [0-9.]+ \|", md,
                     re.M), (r, md)


@pytest.mark.slow
@pytest.mark.skipif(SKIP_MP is not None, reason=str(SKIP_MP))
def test_two_processes_give_the_single_device_step(tmp_path, bench):
  """2 processes x 2 CPU devices, N=4: the losses of a single-device step, process 0's
  files."""
  names = ["muon/gather_whole"]
  result = launch.launch(
      [sys.executable, str(SCRIPT), *TINY, "--multiprocess", "--sizes", "4",
       "--optimizers", *names, "--out", str(tmp_path)],
      num_processes=2, devices_per_process=2, timeout=300, xla_flags=(FAST_COMPILE,))
  result.check()
  result = json.loads((tmp_path / "bench_scaling.json").read_text())
  meta, rows = result["meta"], result["rows"]
  assert (meta["num_devices"], meta["process_count"], meta["status"]) == (4, 2, "done")
  assert [(r["layout"], r["data"], r["fsdp"]) for r in rows] == [("dp", 4, 1),
                                                                 ("dp_fsdp", 2, 2)]

  # The same step on one device, without a mesh.
  cfg = bench.user_gpt.get_config("tiny", num_layers=1, seq_len=SEQ, dtype="float32")
  model = bench.Model.build(cfg)
  tokens = bench.batch_tokens(cfg, 4 * PER_DEVICE_BATCH, SEQ)
  x, y = jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])
  for name in names:
    tx = bench.OPTIMIZERS[name][0](jnp.float32)
    params = jax.tree.map(jnp.asarray, model.host_params)
    state = tx.init(params)
    step = jax.jit(bench.make_train_step(model.graphdef, model.rest, tx))
    params, state, first = step(params, state, x, y)
    _, _, after = step(params, state, x, y)
    for r in (r for r in rows if bench.config_name(r) == name):
      assert r["error"] is None and math.isfinite(r["ms_per_step"]), r
      assert r["first_loss"] == pytest.approx(float(first), rel=LOSS_RTOL), r
      assert r["loss_after_one_step"] == pytest.approx(float(after), rel=LOSS_RTOL), r
      assert r["step_bytes"]["total"] > 0, r
  assert "2 process(es)" in (tmp_path / "bench_scaling.md").read_text()


def _row(bench, n, layout, name, ms, update_ms):
  data, fsdp = (n, 1) if layout == "dp" else (n // 2, 2)
  row = bench.new_row(n, layout, data, fsdp, name, 2 * n, 8)
  row.update(ms_per_step=ms, update_ms=update_ms)
  return row


def test_derived_figures(bench):
  meta = {"peak_tflops": 100.0, "num_params": 1000}
  rows = [_row(bench, 1, "dp", "muon/auto", 10.0, 4.0),
          _row(bench, 4, "dp_fsdp", "muon/auto", 20.0, 1.0),
          _row(bench, 4, "dp", "optax.adamw", 5.0, 1.0),  # no N=1 row of its own
          _row(bench, 2, "dp", "muon/gather_whole", None, None)]  # not timed
  bench.fill_derived(meta, rows)
  base, fsdp, adamw, untimed = rows
  assert base["tokens_per_s"] == 16 / 10e-3 and base["scaling_efficiency"] == 1.0
  assert fsdp["tokens_per_s"] == 64 / 20e-3
  assert fsdp["scaling_efficiency"] == pytest.approx((64 / 20) / (4 * 16 / 10))
  assert fsdp["update_speedup"] == 4.0
  assert fsdp["mfu"] == pytest.approx(6 * 1000 * (64 / 20e-3) / (4 * 100e12))
  assert adamw["scaling_efficiency"] is None and adamw["update_speedup"] is None
  assert all(untimed[k] is None for k in ("tokens_per_s", "mfu", "scaling_efficiency"))


def test_merge_replaces_only_what_is_measured_again(bench, tmp_path):
  path = tmp_path / "bench_scaling_x.json"
  old_meta = {k: 1 for k in bench.MERGE_KEYS}
  old_meta["runs"] = [{"command": "a", "date": "d1", "sizes": [1, 2, 4]}]
  rows = [_row(bench, n, "dp", name, 1.0, 1.0) for n in (1, 2, 4)
          for name in ("optax.adamw", "muon/auto")]
  path.write_text(json.dumps({"meta": old_meta, "rows": rows}))
  meta = {k: 1 for k in bench.MERGE_KEYS}
  meta["runs"] = [{"command": "b", "date": "d2", "sizes": [4]}]
  kept = bench.merged_rows(path, meta, {(4, "dp", "muon/auto"), (4, "dp_fsdp", "muon/auto")})
  assert [bench.row_key(r) for r in kept] == [
      (1, "dp", "optax.adamw"), (1, "dp", "muon/auto"), (2, "dp", "optax.adamw"),
      (2, "dp", "muon/auto"), (4, "dp", "optax.adamw")]
  assert [r["command"] for r in meta["runs"]] == ["a", "b"]
  assert bench.merged_rows(tmp_path / "absent.json", meta, set()) == []
  meta["seq"] = 2
  with pytest.raises(ValueError, match=r"seq=1 \(now 2\)"):
    bench.merged_rows(path, meta, set())


def test_sizes_and_layouts(bench):
  assert bench.default_sizes(1) == [1] and bench.default_sizes(6) == [1, 2, 4]
  assert bench.default_sizes(8) == [1, 2, 4, 8]
  assert bench.check_sizes([4, 1, 4], 8, 1) == [1, 4]
  with pytest.raises(ValueError, match=r"--sizes \[16\]: only 8 devices"):
    bench.check_sizes([2, 16], 8, 1)
  with pytest.raises(ValueError, match=r"--sizes \[1, 3\]: with 2 processes"):
    bench.check_sizes([1, 2, 3], 8, 2)
  assert bench.layouts_of(1, 2) == [("dp", 1, 1, None)]
  assert bench.layouts_of(8, 4) == [("dp", 8, 1, None), ("dp_fsdp", 2, 4, None)]
  assert bench.layouts_of(6, 4)[1] == ("dp_fsdp", None, 4, "--fsdp 4 does not divide N=6")
  devices = bench.mesh_devices(2)
  assert devices == jax.devices()[:2]


@pytest.mark.parametrize("argv,message", [
    (["--sizes", "0"], "--sizes must be >= 1"),
    (["--fsdp", "1"], "--fsdp must be >= 2"),
    (["--compile-workers", "0"], "--compile-workers must be >= 1"),
    (["--peak-tflops", "inf"], "--peak-tflops must be a positive number"),
    (["--kind-name", "h200/x8"], "--kind-name must be letters"),
    (["--optimizers", "muon"], "invalid choice: 'muon'"),
])
def test_bad_options_are_refused(bench, capsys, argv, message):
  with pytest.raises(SystemExit):
    bench.parse_args(argv)
  assert message in capsys.readouterr().err


def test_too_many_devices_are_refused_before_building_anything(bench, capsys, monkeypatch):
  monkeypatch.setattr(bench.Model, "build", lambda cfg: pytest.fail("built a model"))
  with pytest.raises(SystemExit):
    bench.main(["--sizes", str(jax.device_count() + 1), "--out", "/nonexistent"])
  assert f"only {jax.device_count()} devices" in capsys.readouterr().err


def test_failures_merges_and_the_compile_budget_are_recorded(bench, tmp_path, monkeypatch,
                                                            capsys):
  """Nothing compiles here: a factory that fails (twice, merged), then a budget spent."""
  run = ["run 1"]

  def broken(dtype):
    raise ValueError(f"cannot build this one ({run[0]})")
  monkeypatch.setitem(bench.OPTIMIZERS, "optax.adamw", (broken, None))
  common = [*TINY, "--optimizers", "optax.adamw", "--out", str(tmp_path)]
  assert bench.main([*common, "--sizes", "1", "2"]) == 0
  assert re.search(r"^\| 2 \| 1 x 2 \| optax.adamw \| – \| – \|.*cannot build this one",
                   capsys.readouterr().out, re.M)
  run[0] = "run 2"
  assert bench.main([*common, "--sizes", "2", "--merge"]) == 0
  result = json.loads((tmp_path / "bench_scaling.json").read_text())
  meta, rows = result["meta"], result["rows"]
  assert [(r["n"], r["layout"], r["error"]) for r in rows] == [
      (1, "dp", "ValueError: cannot build this one (run 1)"),
      (2, "dp", "ValueError: cannot build this one (run 2)"),
      (2, "dp_fsdp", "ValueError: cannot build this one (run 2)")]
  assert [r["sizes"] for r in meta["runs"]] == [[1, 2], [2]] and meta["sizes"] == [1, 2]
  assert meta["runs"][1]["command"] == meta["command"] and "--merge" in meta["command"]
  assert all(r["ms_per_step"] is None and r["scaling_efficiency"] is None for r in rows)

  assert bench.main([*TINY, "--optimizers", "muon/auto", "--sizes", "1", "2",
                     "--compile-budget", "1e-9", "--kind-name", "budget",
                     "--out", str(tmp_path)]) == 0
  result = json.loads((tmp_path / "bench_scaling_budget.json").read_text())
  meta, rows = result["meta"], result["rows"]
  assert meta["status"] == "done" and meta["compile_budget"] == 1e-9 and len(rows) == 3
  for r in rows:
    assert r["skipped"].startswith(f"not compiled: the compile phase of N={r['n']} took")
    assert r["compile_s"] is None and r["error"] is None
