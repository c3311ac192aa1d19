"""benchmarks/bench_user_loop.py and its user-written model benchmarks/user_gpt.py."""

import gc
import importlib
import json
import math
import pathlib
import re

import jax
import numpy
import pytest
from flax import nnx

import ortho_optax as oo

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
ROW_KEYS = {"optimizer", "tokens_per_step", "ms_per_step", "vs_adamw", "compile_s",
            "peak_mem_gb", "round_ms", "first_loss", "last_loss", "error", "skipped",
            "dispatch_ms", "round_dispatch_ms"}


@pytest.fixture
def bench(monkeypatch):
  monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import their siblings
  return importlib.import_module("bench_user_loop")


@pytest.fixture
def user_gpt(monkeypatch):
  monkeypatch.syspath_prepend(str(BENCHMARKS))
  return importlib.import_module("user_gpt")


def test_tiny_run_writes_rows_for_every_optimizer(bench, tmp_path, capsys, monkeypatch):
  def broken():
    raise ValueError("cannot build this one")
  monkeypatch.setitem(bench.OPTIMIZERS, "broken", broken)
  names = ["optax.adamw", "optax.contrib.muon", "muon"]
  assert bench.main(["--preset", "tiny", "--batch", "2", "--seq", "16", "--rounds", "1",
                     "--steps", "1", "--optimizers", "optax.adamw", "broken", *names[1:],
                     "--out", str(tmp_path)]) == 0
  result = json.loads((tmp_path / "bench_user_loop.json").read_text())
  meta, rows = result["meta"], result["rows"]
  assert meta["status"] == "done"
  assert (meta["preset"], meta["batch"], meta["seq"], meta["rounds"], meta["steps"]) == (
      "tiny", 2, 16, 1, 1)
  assert meta["jax"] == jax.__version__ and "--optimizers" in meta["command"]
  # The timing rounds froze what was alive out of the collector's passes, and let go after.
  assert meta["gc"].startswith("gc.freeze()") and gc.get_freeze_count() == 0
  assert [r["optimizer"] for r in rows] == ["optax.adamw", "broken", *names[1:]]
  assert all(set(r) == ROW_KEYS for r in rows), rows
  # A failure is recorded in its row and the run goes on.
  failed = rows.pop(1)
  assert failed["error"] == "ValueError: cannot build this one"
  assert failed["ms_per_step"] is None and failed["vs_adamw"] is None
  for r in rows:
    assert r["error"] is None and r["skipped"] is None, r
    assert r["tokens_per_step"] == 2 * 16
    for key in ("ms_per_step", "compile_s", "peak_mem_gb", "first_loss", "last_loss"):
      assert math.isfinite(r[key]) and r[key] > 0, (key, r)
    assert len(r["round_ms"]) == 1 and r["round_ms"][0] == r["ms_per_step"]
    assert math.isfinite(r["vs_adamw"]) and r["vs_adamw"] > -1
  baseline = rows[0]
  assert baseline["vs_adamw"] == 0.0
  assert rows[1]["vs_adamw"] == pytest.approx(
      rows[1]["ms_per_step"] / baseline["ms_per_step"] - 1)
  # Same seed and batch: every optimizer starts from the same loss.
  assert len({round(r["first_loss"], 5) for r in rows}) == 1
  md = (tmp_path / "bench_user_loop.md").read_text()
  assert md.strip() in capsys.readouterr().out
  assert all(re.search(rf"^\| {re.escape(n)} \| [0-9.]+ \|", md, re.M) for n in names), md
  assert re.search(r"^\| broken \| – \|.*cannot build this one", md, re.M), md


def test_slow_compiles_are_left_out_of_the_timing(bench, tmp_path, monkeypatch):
  def fake_compile(run):  # a first step of 5 s, without compiling anything
    run.model, run.optimizer = object(), object()
    run.row.update(compile_s=5.0, first_loss=1.0, peak_mem_gb=1.0)
  monkeypatch.setattr(bench.Run, "build_and_compile", fake_compile)
  monkeypatch.setattr(bench.Run, "read_footprint", lambda run: None)
  monkeypatch.setattr(bench.Run, "time_block", lambda run, steps: pytest.fail("timed"))
  bench.main(["--preset", "tiny", "--seq", "8", "--optimizers", "optax.adamw", "muon",
              "--skip-on-compile-over", "4", "--out", str(tmp_path)])
  rows = json.loads((tmp_path / "bench_user_loop.json").read_text())["rows"]
  for r in rows:
    assert r["skipped"] == "first step 5.0 s > --skip-on-compile-over 4 s"
    assert r["compile_s"] == 5.0 and r["ms_per_step"] is None

  bench.main(["--preset", "tiny", "--seq", "8", "--optimizers", "optax.adamw", "muon",
              "--compile-budget", "1e-9", "--out", str(tmp_path)])
  rows = json.loads((tmp_path / "bench_user_loop.json").read_text())["rows"]
  for r in rows:
    assert r["skipped"].startswith("not compiled: the compile phase took"), r
    assert r["compile_s"] is None


@pytest.mark.parametrize("flag,value", [("--steps", "0"), ("--skip-on-compile-over", "-1"),
                                        ("--compile-budget", "nan")])
def test_bad_option_values_are_refused(bench, tmp_path, capsys, flag, value):
  with pytest.raises(SystemExit):
    bench.main([flag, value, "--out", str(tmp_path)])
  assert flag in capsys.readouterr().err


def test_unknown_optimizer_name_is_refused(bench, tmp_path, capsys):
  with pytest.raises(SystemExit):
    bench.main(["--optimizers", "adamw", "--out", str(tmp_path)])
  assert "optax.adamw" in capsys.readouterr().err  # the message lists the choices


def test_default_routing_of_the_user_model(user_gpt):
  """Every 2-D hidden kernel is orthogonalized; embeddings, head, norms and biases not."""
  model = user_gpt.GPT(user_gpt.get_config("tiny"), rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  report = oo.routing_report(params)
  labels = {}
  for line in report.splitlines()[2:]:
    m = re.match(r"^(\S+)\s+\([0-9, ]*\)\s+float32\s+(\w+)\s", line)
    if m:
      labels[m[1]] = m[2]
  paths = [oo.matrix_view.path_str(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))[0]]
  assert sorted(labels) == sorted(paths), report
  hidden = [p for p in paths if re.fullmatch(r"h/\d+/(attn/c_attn|attn/c_proj|mlp/c_fc|"
                                            r"mlp/c_proj)/kernel", p)]
  assert len(hidden) == 4 * 2
  for path, label in labels.items():
    assert label == ("ortho" if path in hidden else "adam"), (path, report)
  assert {"wte/embedding", "wpe/embedding", "lm_head/kernel"} <= set(labels)


def test_bad_model_config_is_refused(user_gpt):
  with pytest.raises(ValueError, match="num_heads=5"):
    user_gpt.get_config("tiny", num_heads=5)
  with pytest.raises(ValueError, match="seq_len must be a positive int, got 0"):
    user_gpt.get_config("small", seq_len=0)
  with pytest.raises(ValueError, match="preset='base'.*small"):
    user_gpt.get_config("base")


def test_variants_are_named_only(bench):
  assert not set(bench.VARIANTS) & set(bench.parse_args([]).optimizers)
  assert bench.parse_args(["--optimizers", "optax.adamw", "muon/gram"]).optimizers == [
      "optax.adamw", "muon/gram"]
  params = {"w": jax.numpy.ones((8, 32)) * jax.numpy.arange(32.0)}
  grads = {"w": jax.random.normal(jax.random.key(0), (8, 32))}
  # Gram NS against NS, both bf16: their roundings differ by ~2% of the update; bf16
  # against the float32 iteration: Keller's quintic leaves σ anywhere in ~[0.7, 1.1].
  for name, default, bound in (("muon/gram", oo.muon, 0.05),
                               ("turbo_muon/gram", oo.turbo_muon, 0.05),
                               ("oadamw/bf16", oo.oadamw, 0.3),
                               ("hybrid_auon/bf16", oo.hybrid_auon, 0.3)):
    tx, ref = bench.VARIANTS[name](), default()
    got, _ = tx.update(grads, tx.init(params), params)
    want, _ = ref.update(grads, ref.init(params), params)
    gap = numpy.linalg.norm(got["w"] - want["w"]) / numpy.linalg.norm(want["w"])
    assert 0 < gap < bound, (name, gap)


def test_first_step_times_the_parts_and_reports_bad_cases(monkeypatch, tmp_path, capsys):
  # benchmarks/first_step.py: lowering, compilation and runs timed apart, one row per case;
  # a case it cannot run is an error row and a failing exit status, not a crash.
  monkeypatch.syspath_prepend(str(BENCHMARKS))
  first_step = importlib.import_module("first_step")
  assert first_step.main(["--preset", "tiny", "--out", str(tmp_path),
                          "--cases", "trainer:muon", "user:adamw", "bogus:muon"]) == 1
  rows = json.loads((tmp_path / "first_step.json").read_text())["rows"]
  assert [r["case"] for r in rows] == ["trainer:muon", "user:adamw", "bogus:muon"]
  for r in rows[:2]:
    assert all(r[k] > 0 for k in ("lower_s", "compile_s", "first_run_s", "second_run_s"))
  assert "expected trainer:NAME" in rows[2]["error"]
