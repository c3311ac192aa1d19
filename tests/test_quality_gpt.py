"""benchmarks/quality_gpt.py: the blocks end to end on a tiny model, the report's numbers on
hand-made curves, and the plan's calls."""

import importlib.util
import json
import pathlib
import shlex
import sys

import jax
import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "quality_gpt.py"
_SPEC = importlib.util.spec_from_file_location("quality_gpt", _PATH)
quality_gpt = importlib.util.module_from_spec(_SPEC)
sys.modules["quality_gpt"] = quality_gpt  # dataclasses look their module up
_SPEC.loader.exec_module(quality_gpt)

# Full runs as long as the sweep's: a full run is then the program of a sweep run, which the
# persistent compilation cache holds (test_study_steps_per_block checks the lengths).
TINY = ["--preset", "tiny", "--num-layers", "1", "--model-dim", "32", "--num-heads", "2",
        "--seq-len", "16", "--batch-size", "4", "--sweep-steps", "4", "--steps", "4",
        "--sweep-eval-every", "2", "--eval-every", "2", "--eval-batches", "1"]


@pytest.fixture
def compilation_cache(tmp_path):
  """A persistent compilation cache in ``tmp_path`` for one test: every run compiles the
  same evaluation, and each full run a sweep run's step (compiling takes most of the time)."""
  from jax._src import compilation_cache as cc  # pylint: disable=import-outside-toplevel
  settings = {"jax_compilation_cache_dir": str(tmp_path / "jax_cache"),
              "jax_persistent_cache_min_compile_time_secs": 0.0,
              "jax_persistent_cache_min_entry_size_bytes": 0}
  old = {k: getattr(jax.config, k) for k in settings if hasattr(jax.config, k)}
  for k in old:
    jax.config.update(k, settings[k])
  cc.reset_cache()
  yield
  for k, v in old.items():
    jax.config.update(k, v)
  cc.reset_cache()


def _runs(folder):
  return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


@pytest.mark.usefixtures("compilation_cache")
def test_sweep_full_report_end_to_end(tmp_path, capsys):
  out = tmp_path / "calls"
  common = TINY + ["--prior", "--out", str(out)]
  sweep = ["--block", "sweep", "--optimizers", "adamw", "muon",
           "--lrs", "adamw=1e-3,3e-3", "muon=0.02,0.06"] + common
  assert quality_gpt.main(sweep) == 0
  runs = _runs(out / "sweep")
  assert sorted(runs) == ["sweep-adamw-lr0.001-seed0", "sweep-adamw-lr0.003-seed0",
                          "sweep-muon-lr0.02-seed0", "sweep-muon-lr0.06-seed0"]
  for r in runs.values():
    assert r["status"] == "done" and r["completed_steps"] == 4
    assert [s for s, _ in r["val_loss"]] == [2, 4] and len(r["val_seconds"]) == 2
    assert 0 < r["val_seconds"][0] < r["val_seconds"][1] == pytest.approx(r["timings"]["train_s"])
    assert [s for s, _ in r["train_loss"]] == [0, 1, 2, 3]
    assert r["final_val_loss"] == r["val_loss"][-1][1]
    assert r["data"]["name"] == "stdlib" and r["record"]["data_sha256"] == r["data"]["sha256"]
    assert r["corpus"]["manifest_sha256"] and r["config"]["model_config"]["vocab_size"] == 256
  # The same command again trains nothing.
  capsys.readouterr()
  assert quality_gpt.main(sweep) == 0
  assert "0 ran, 4 finished already, 0 failed, 0 left." in capsys.readouterr().out
  assert _runs(out / "sweep") == runs

  # Full runs at each optimizer's best sweep lr.
  assert quality_gpt.main(["--block", "full", "--optimizers", "adamw", "muon"] + common) == 0
  best = {o: min((r for r in runs.values() if r["study"]["optimizer"] == o),
                 key=lambda r: r["final_val_loss"])["study"]["lr"] for o in ("adamw", "muon")}
  full = _runs(out / "full")
  assert sorted(full) == [f"full-{o}-lr{best[o]:g}-seed0" for o in ("adamw", "muon")]
  assert all(r["completed_steps"] == 4 and r["status"] == "done" for r in full.values())
  # A budget that the measured runs do not fit in starts nothing and says what is left.
  capsys.readouterr()
  assert quality_gpt.main(["--block", "full", "--optimizers", "muon", "--seeds", "1",
                           "--budget-s", "0.01"] + common) == 0
  assert "left for the next call: full-muon" in capsys.readouterr().out
  assert sorted(_runs(out / "full")) == sorted(full)

  # The plan lists only what is left: no sweep, no seed-0 full run, the top seeds' call.
  capsys.readouterr()
  assert quality_gpt.main(["--plan", "--optimizers", "adamw", "muon", "--lrs",
                           "adamw=1e-3,3e-3", "muon=0.02,0.06", "--step-ms", "10"]
                          + TINY + ["--prior", str(out)]) == 0
  text = capsys.readouterr().out
  assert "6 run(s) of this study" in text and "--block sweep" not in text
  assert "--block full --optimizers" not in text and "--block full --top 3 --seeds 1" in text

  report = tmp_path / "report"
  assert quality_gpt.main(["--block", "report", "--inputs", str(out), "--out", str(report)]) == 0
  for name in ("quality_gpt.md", "val_vs_steps.png", "val_vs_seconds.png", "lr_sweep.png"):
    assert (report / name).stat().st_size > 0
  summary = json.loads((report / "quality_gpt.json").read_text())
  rows = summary["summary"]["rows"]
  assert set(rows) == {"adamw", "muon"}
  assert rows["adamw"]["step_ratio"] == pytest.approx(1.0)
  assert {o: p["lr"] for o, p in summary["lrs"].items()} == best
  muon = full[f"full-muon-lr{best['muon']:g}-seed0"]
  assert rows["muon"]["final_val_loss"] == muon["final_val_loss"]


def test_a_failing_run_is_recorded_and_the_block_goes_on(tmp_path, monkeypatch):
  def fail(cfg, *args):
    raise RuntimeError(f"no memory for lr {cfg.lr}")

  monkeypatch.setattr(quality_gpt, "train_run", fail)
  out = tmp_path / "o"
  argv = ["--block", "sweep", "--optimizers", "muon", "--lrs", "muon=0.02,0.06"] + TINY + [
      "--prior", "--out", str(out)]
  assert quality_gpt.main(argv) == 1
  errors = sorted(p.name for p in (out / "errors").glob("*.json"))
  assert errors == ["sweep-muon-lr0.02-seed0.json", "sweep-muon-lr0.06-seed0.json"]
  assert "no memory for lr 0.06" in (out / "errors" / errors[1]).read_text()
  status = json.loads((out / "status-sweep.json").read_text())
  assert status["failed"] == ["sweep-muon-lr0.02-seed0", "sweep-muon-lr0.06-seed0"]
  assert quality_gpt.load_runs([out]) == []  # an error file is not a run file


def _run(block, opt, lr, seed, steps, loss, step_s, status="done"):
  """A hand-made run file: validation every 100 steps, ``loss(step)``, ``step_s`` a step."""
  evals = list(range(100, steps + 1, 100))
  val = [[s, float(loss(s))] for s in evals]
  return {
      "study": {"block": block, "optimizer": opt, "lr": lr, "seed": seed,
                "name": f"{block}-{opt}-lr{lr:g}-seed{seed}"},
      "status": status, "record": {},
      "config": {"preset": "small", "steps": steps, "batch_size": 32, "warmup_steps": 0.05,
                 "schedule": "cosine", "final_lr_frac": 0.0, "adam_lr": 3e-3,
                 "weight_decay": 0.0, "opt_args": {}, "eval_batches": 16, "lr": lr,
                 "model_config": {"num_layers": 12, "model_dim": 768, "num_heads": 12,
                                  "vocab_size": 256, "seq_len": 1024}},
      "data": {"name": "stdlib", "sha256": "ab" * 32, "train_tokens": 7_500_000,
               "val_tokens": 860_000},
      "corpus": None, "num_params": 85_327_872, "train_loss": [], "val_loss": val,
      "val_seconds": [s * step_s for s in evals],
      "final_val_loss": val[-1][1] if status == "done" else None,
      "final_train_loss": val[-1][1] - 0.1, "completed_steps": steps,
      "diverged_at": 300 if status == "diverged" else None,
      "timings": {"median_step_s": step_s, "tokens_per_s": 32768 / step_s, "compile_s": 20.0},
      "machine": {"device": "NVIDIA H200", "backend": "gpu", "jax": "0.11.2",
                  "date": "2026-12-02T00:00:00+00:00"}}


def _write_runs(folder, runs):
  for r in runs:
    path = folder / r["study"]["block"] / f"{r['study']['name']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(r))


def _fixture(turbo_step_s):
  adamw = lambda s: 3.0 - s / 1000  # final 2.0 at step 1000  # noqa: E731
  muon = lambda s: max(3.0 - s / 600, 1.5)  # reaches 2.0 at step 600  # noqa: E731
  return [
      _run("sweep", "adamw", 1e-3, 0, 300, lambda s: 2.9 - s / 1000, 0.1),
      _run("sweep", "adamw", 3e-3, 0, 300, lambda s: 2.8 - s / 1000, 0.1),  # best, at the edge
      _run("sweep", "muon", 0.01, 0, 300, lambda s: 2.5, 0.11),
      _run("sweep", "muon", 0.02, 0, 300, lambda s: 2.4, 0.11),  # best, inside the grid
      _run("sweep", "muon", 0.04, 0, 300, lambda s: 2.6, 0.11, status="diverged"),
      _run("full", "adamw", 3e-3, 0, 1000, adamw, 0.1),
      # Two muon seeds 0.002 nats apart: their mean is muon's curve.
      _run("full", "muon", 0.02, 0, 1000, lambda s: muon(s) - 0.001, 0.11),
      _run("full", "muon", 0.02, 1, 1000, lambda s: muon(s) + 0.001, 0.11),
      # Not the sweep's lr: a full run at another lr is not muon's curve.
      _run("full", "muon", 0.01, 0, 1000, lambda s: 1.0, 0.11),
      _run("full", "turbo_muon", 0.02, 0, 1000, lambda s: muon(s) + 0.005, turbo_step_s),
      _run("full", "aurora", 0.02, 0, 1000, adamw, 0.2, status="diverged"),
  ]


def test_report_numbers_on_hand_made_curves(tmp_path):
  _write_runs(tmp_path, _fixture(turbo_step_s=0.12))
  summary = quality_gpt.block_report([tmp_path], tmp_path / "report")
  rows, goals = summary["rows"], summary["goals"]
  assert summary["target"] == pytest.approx(2.0)
  assert summary["reference_steps_to_target"] == pytest.approx(1000)
  assert rows["muon"]["seeds"] == [0, 1] and rows["muon"]["lr"] == 0.02
  assert rows["muon"]["final_val_loss"] == pytest.approx(1.5)
  assert rows["muon"]["seed_spread"] == pytest.approx(0.002)
  assert rows["muon"]["steps_to_reference"] == pytest.approx(600)
  assert rows["muon"]["step_ratio"] == pytest.approx(0.6)
  assert rows["muon"]["time_ratio"] == pytest.approx(0.6 * 0.11 / 0.1)
  assert rows["turbo_muon"]["steps_to_reference"] == pytest.approx(603)
  assert goals["muon_step_ratio"]["passed"]
  assert goals["muon_step_ratio"]["value"] == pytest.approx(0.6)
  assert goals["turbo_gap"]["value"] == pytest.approx(0.005) and goals["turbo_gap"]["passed"]
  # Equal time = adamw's 100 s: muon at step 909 (1.5), turbo_muon at step 833.
  order = goals["equal_time_order"]
  assert order["budget_s"] == pytest.approx(100.0)
  assert rows["turbo_muon"]["val_at_equal_time"] == pytest.approx(3.005 - (100 / 0.12) / 600)
  assert order["order_at_equal_steps"] == ["muon", "turbo_muon", "adamw"]
  assert order["passed"] and order["swaps"] == []
  assert "aurora" not in rows
  text = (tmp_path / "report" / "quality_gpt.md").read_text()
  assert "diverged at step 300" in text and "| adamw | 0.003 |" in text
  lrs = json.loads((tmp_path / "report" / "quality_gpt.json").read_text())["lrs"]
  assert lrs["adamw"]["edge"] == "highest" and lrs["muon"]["edge"] is None
  assert lrs["muon"]["grid"] == [[0.01, 2.4 + 0.1], [0.02, 2.4], [0.04, None]]


def test_report_sees_a_swap_at_equal_time_and_a_miss(tmp_path):
  # turbo_muon twice as slow a step: at adamw's 100 s it is at step 417, above adamw's 2.0.
  runs = _fixture(turbo_step_s=0.24)
  runs.append(_run("full", "normuon", 1e-3, 0, 1000, lambda s: 2.5 - s / 5000, 0.1))
  _write_runs(tmp_path, runs)
  summary = quality_gpt.block_report([tmp_path], tmp_path / "report")
  order = summary["goals"]["equal_time_order"]
  assert not order["passed"] and ("turbo_muon", "adamw") in [tuple(p) for p in order["swaps"]]
  assert summary["rows"]["normuon"]["steps_to_reference"] is None  # never reaches 2.0
  assert summary["rows"]["normuon"]["step_ratio"] is None
  assert "not reached" in (tmp_path / "report" / "quality_gpt.md").read_text()


def test_report_explains_a_swap_by_a_curve_that_rises_at_the_end(tmp_path):
  # aurora (a slower step) falls to 1.2 by step 500 and rises to 1.6: at adamw's 100 s
  # (its step 500) it is lower than muon there, though it ends above muon's 1.5.
  runs = _fixture(turbo_step_s=0.12)
  runs = [r for r in runs if r["study"]["optimizer"] != "aurora"]
  runs.append(_run("full", "aurora", 0.02, 0, 1000,
                   lambda s: 3.0 - 0.0036 * s if s <= 500 else 1.2 + (s - 500) / 1250, 0.2))
  _write_runs(tmp_path, runs)
  summary = quality_gpt.block_report([tmp_path], tmp_path / "report")
  row, order = summary["rows"]["aurora"], summary["goals"]["equal_time_order"]
  assert row["lowest_val_loss"] == pytest.approx(1.2, abs=1e-3)
  assert row["lowest_val_step"] == 500 and row["final_val_loss"] == pytest.approx(1.6)
  assert ("muon", "aurora") in [tuple(p) for p in order["swaps"]]
  assert order["rising_at_the_end"] == ["aurora"] and not order["passed"]
  text = (tmp_path / "report" / "quality_gpt.md").read_text()
  assert "aurora's validation loss rises from 1.2000 at step 500 to 1.6000" in text
  assert "| 1.5000 (900) |" in text  # muon reaches its floor of 1.5 at step 900


def test_study_steps_per_block():
  args = quality_gpt.build_parser().parse_args(
      ["--block", "full", "--preset", "tiny", "--steps", "12", "--sweep-steps", "5",
       "--eval-every", "4", "--sweep-eval-every", "5"])
  study = quality_gpt.Study(args)
  dataset = quality_gpt.data_lib.load_dataset("embedded:prose")
  full = study.config(quality_gpt.RunSpec("full", "muon", 0.02, 1), dataset)
  sweep = study.config(quality_gpt.RunSpec("sweep", "muon", 0.05, 0), dataset)
  assert (full.steps, full.eval_every, full.seed, full.lr) == (12, 4, 1, 0.02)
  assert (sweep.steps, sweep.eval_every, sweep.seed, sweep.lr) == (5, 5, 0, 0.05)
  assert full.model_config().vocab_size == 256 and full.optimizer == "muon"
  with pytest.raises(ValueError, match="--steps"):
    quality_gpt.Study(quality_gpt.build_parser().parse_args(
        ["--block", "full", "--preset", "tiny", "--steps", "-3"])).config(
            quality_gpt.RunSpec("full", "muon", 0.02, 0), dataset)


def test_first_crossing_and_value_at():
  xs, ys = [100, 200, 300], [3.0, 2.0, 1.0]
  assert quality_gpt.first_crossing(xs, ys, 2.5) == pytest.approx(150)
  assert quality_gpt.first_crossing(xs, ys, 2.0) == pytest.approx(200)
  assert quality_gpt.first_crossing(xs, ys, 3.5) == 100  # already below at the first point
  assert quality_gpt.first_crossing(xs, ys, 0.5) is None
  assert quality_gpt.first_crossing([1, 2, 3], [2.0, 3.0, 1.0], 1.5) == pytest.approx(2.75)
  assert quality_gpt.value_at(xs, ys, 250) == pytest.approx(1.5)
  assert quality_gpt.value_at(xs, ys, 50) is None and quality_gpt.value_at(xs, ys, 301) is None


def test_parse_lrs_and_top():
  assert quality_gpt.parse_lrs(["muon=0.01,0.02", "adamw=1e-3"]) == {
      "muon": [0.01, 0.02], "adamw": [0.001]}
  for bad in (["muon"], ["muon=fast"], ["muon=-1"], ["nope=1"]):
    with pytest.raises(ValueError):
      quality_gpt.parse_lrs(bad)
  runs = _fixture(0.12)
  assert quality_gpt.top_optimizers(runs, 1) == ["muon", "adamw"]
  assert quality_gpt.top_optimizers(runs, 5) == ["muon", "turbo_muon", "adamw"]


def test_plan_lists_parsable_calls_within_the_call_budget(capsys):
  assert quality_gpt.main(["--plan", "--step-ms", "80", "muon=100", "--prior"]) == 0
  text = capsys.readouterr().out
  commands = [line.split("] ", 1)[1] for line in text.splitlines()
              if "quality_gpt.py --block" in line and "[CPU]" not in line]
  sweeps = [c for c in commands if "--block sweep" in c]
  fulls = [c for c in commands if "--block full" in c]
  assert sweeps and fulls and "--top 3 --seeds 1" in fulls[-1]
  planned = set()
  for c in commands:
    argv = shlex.split(c.replace("$OUT", "/tmp/o").replace("$PWD", "."))
    argv = argv[argv.index("benchmarks/quality_gpt.py") + 1:]
    args = quality_gpt.build_parser().parse_args(argv)
    assert args.budget_s == quality_gpt.DEFAULT_CALL_S and args.out == "/tmp/o/quality_gpt"
    if args.block == "sweep":
      planned.update(args.optimizers)
  assert planned == set(quality_gpt.STUDY_OPTIMIZERS)
  minutes = [float(line.split("[")[1].split(" min")[0]) for line in text.splitlines()
             if " min, " in line]
  assert max(minutes) * 60 <= quality_gpt.DEFAULT_CALL_S
  assert "muon 100.0 (--step-ms)" in text and "adamw 80.0 (--step-ms)" in text
  assert f"Total: {len(commands)} device calls" in text


def test_plan_of_optimizers_without_the_reference(capsys):
  # The second seeds' call adds adamw to the top optimizers: its step time must be known.
  assert quality_gpt.main(["--plan", "--optimizers", "adamuon", "--step-ms", "80",
                           "--prior"]) == 0
  text = capsys.readouterr().out
  assert "--block sweep --optimizers adamuon" in text and "--top 3 --seeds 1" in text
