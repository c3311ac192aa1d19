"""benchmarks/tiny_sweep.py: equal-wall-clock budget, interleaved timing, merge checks."""

import importlib.util
import json
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "tiny_sweep.py"
_SPEC = importlib.util.spec_from_file_location("tiny_sweep", _PATH)
tiny_sweep = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(tiny_sweep)


@pytest.mark.parametrize("step_s", [0.07, 0.1, 0.158, 0.3, 1 / 3, 0.8165659926798886])
def test_reference_gets_exactly_its_own_steps(step_s):
  assert tiny_sweep.steps_in_budget(300 * step_s, step_s) == 300


def test_steps_in_budget_floors_and_keeps_one_step():
  assert tiny_sweep.steps_in_budget(30.0, 0.2) == 150  # twice as slow: half the steps
  assert tiny_sweep.steps_in_budget(30.0, 0.07) == 428  # 428.57 -> 428
  assert tiny_sweep.steps_in_budget(30.0, 0.0999) == 300  # 300.3 -> 300
  assert tiny_sweep.steps_in_budget(30.0, 0.1001) == 299  # 299.7 -> 299
  assert tiny_sweep.steps_in_budget(0.01, 5.0) == 1
  for bad in (0.0, -1.0, float("nan"), float("inf")):
    with pytest.raises(ValueError, match="step_s"):
      tiny_sweep.steps_in_budget(30.0, bad)


def test_interleaved_step_times_rotates_and_takes_the_median():
  now = [0.0]
  calls = []
  # Per-step cost of each trainer; "b" gets one slow round (background load spike).
  cost = {"a": [0.1] * 5, "b": [0.2, 0.2, 5.0, 0.2, 0.2], "c": [0.3] * 5}

  def trainer(name):
    def run(n):
      calls.append((name, n))
      now[0] += cost[name][sum(1 for c, _ in calls if c == name) - 1] * n
    return run

  out = tiny_sweep.interleaved_step_times({k: trainer(k) for k in "abc"}, rounds=5,
                                          steps_per_round=30, clock=lambda: now[0])
  assert [c for c, _ in calls[:9]] == list("abc" "bca" "cab")  # order rotates per round
  assert all(n == 30 for _, n in calls) and len(calls) == 15
  assert out["a"]["median_step_s"] == pytest.approx(0.1)
  assert out["b"]["median_step_s"] == pytest.approx(0.2)  # the spike is not the median
  assert out["c"]["median_step_s"] == pytest.approx(0.3)
  assert out["b"]["round_step_s"][2] == pytest.approx(5.0)
  with pytest.raises(ValueError, match="rounds"):
    tiny_sweep.interleaved_step_times({"a": trainer("a")}, rounds=0, steps_per_round=3)


def test_splice_section_replaces_or_appends():
  b, e = tiny_sweep.EQUAL_TIME_BEGIN, tiny_sweep.EQUAL_TIME_END
  appended = tiny_sweep.splice_section("# head\n\ntable\n", f"{b}\nnew\n{e}")
  assert appended == f"# head\n\ntable\n\n{b}\nnew\n{e}\n"
  before_notes = tiny_sweep.splice_section("# head\n\ntable\n\n## Notes\n\n* n\n", f"{b}\nx\n{e}")
  assert before_notes == f"# head\n\ntable\n\n{b}\nx\n{e}\n\n## Notes\n\n* n\n"
  text = f"# head\n\n{b}\nold\n{e}\n\n## Notes\n"
  assert tiny_sweep.splice_section(text, f"{b}\nnew\n{e}") == f"# head\n\n{b}\nnew\n{e}\n\n## Notes\n"


def _run(optimizer, lr, **config):
  base = {"optimizer": optimizer, "lr": lr, "preset": "tiny", "model": {}, "data": "embedded",
          "adam_lr": 3e-3, "weight_decay": 0.0, "opt_args": {}, "steps": 300,
          "batch_size": 32, "seq_len": None, "warmup_steps": 0.05, "schedule": "cosine",
          "final_lr_frac": 0.0, "seed": 0, "eval_batches": 16, "eval_every": 30}
  return {"config": base | config}


def test_check_same_setup_rejects_other_steps_or_data():
  tiny_sweep.check_same_setup([_run("adamw", 3e-3), _run("muon", 0.06, eval_every=100)])
  with pytest.raises(ValueError, match="steps=250"):
    tiny_sweep.check_same_setup([_run("adamw", 3e-3), _run("muon", 0.06, steps=250)])
  with pytest.raises(ValueError, match="data='embedded:prose'"):
    tiny_sweep.check_same_setup([_run("adamw", 3e-3), _run("muon", 0.06, data="embedded:prose")])


def test_merge_refuses_mixed_setups(tmp_path):
  for name, run in (("a", _run("adamw", 3e-3)), ("b", _run("muon", 0.06, steps=150))):
    (tmp_path / f"{name}.json").write_text(json.dumps({"runs": [run]}))
  with pytest.raises(ValueError, match="steps=150"):
    tiny_sweep.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                     "--out", str(tmp_path / "out"), "--summary", str(tmp_path / "s.md")])

