"""Checkpoints and resume of the trainer (orbax ``CheckpointManager``), on a micro GPT.

* A run stopped after step k and resumed from its checkpoint is bit-identical to an
  uninterrupted one: losses, validation losses, final parameters and optimizer state
  (the interrupted run saves in the background, ``async_checkpoints``).
* Resuming says so; resuming without a checkpoint, or with another configuration, is an
  error naming what differs, raised before anything is written.
* Two runs with the same seed are bit-identical (another seed is not).
* A step directory orbax never committed is skipped with a warning (the previous
  checkpoint is used); orbax's temporary directories are never read; a damaged array
  store raises; only ``keep_checkpoints`` checkpoints are kept.
"""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

from ortho_optax.models import checkpoints as ckpt_lib
from ortho_optax.models import cli, train as train_lib

MICRO = dict(num_layers=1, model_dim=32, num_heads=2)
STEPS = 6
CLI_MICRO = ["--num-layers", "1", "--model-dim", "32", "--num-heads", "2", "--seq-len", "16",
             "--batch-size", "4", "--steps", str(STEPS), "--data", "embedded:prose",
             "--no-progress", "--eval-batches", "2", "--eval-every", "3", "--log-every", "2",
             "--warmup", "0", "--opt", "muon", "--schedule", "cosine"]


def _cfg(**kw):
  base = dict(preset="tiny", model=MICRO, seq_len=16, data="embedded:prose", batch_size=4,
              steps=STEPS, eval_every=3, eval_batches=2, log_every=2, warmup_steps=0,
              schedule="cosine", optimizer="muon", checkpoint_every=3)
  return train_lib.TrainConfig(**(base | kw))


def _losses(result):
  return [l for _, l in result["train_loss"]]


def _arrays(out_dir, step):
  """The saved arrays of one checkpoint, by path (no target structure needed)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  tree = ocp.StandardCheckpointer().restore(ckpt_lib.directory(out_dir) / str(step) / "state")
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def full(tmp_path_factory):
  """One uninterrupted run with checkpoints at steps 3 and 6."""
  out = tmp_path_factory.mktemp("full")
  return train_lib.train(_cfg(out_dir=str(out)), progress=False), out


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
  """The same run stopped after step 3 (its checkpoint written in the background)."""
  out = tmp_path_factory.mktemp("interrupted")
  part = train_lib.train(_cfg(out_dir=str(out), stop_after=3, async_checkpoints=True),
                         progress=False)
  assert part["completed_steps"] == 3 and len(part["train_loss"]) == 3
  assert ckpt_lib.complete_steps(out) == [3]
  return out


def test_resume_is_bit_identical(full, interrupted, tmp_path, capsys):
  full_result, full_dir = full
  out = tmp_path / "run"
  shutil.copytree(interrupted, out)
  # Checkpoint settings may change on resume: every step now, the newest 2 kept.
  resumed = train_lib.train(_cfg(out_dir=str(out), resume=True, checkpoint_every=1,
                                 keep_checkpoints=2), progress=False)
  assert "resumed from step 3" in capsys.readouterr().err
  assert ckpt_lib.complete_steps(out) == [5, 6]
  assert resumed["resumed_from"] == 3
  # This process timed steps 4-6; the checkpoint carried the first process's 3 steps.
  t = resumed["timings"]
  assert t["steps_timed"] == 3 and t["total_steps_timed"] == STEPS
  assert t["total_train_s"] > t["train_s"] > 0
  assert full_result["timings"]["total_steps_timed"] == STEPS
  assert full_result["timings"]["total_train_s"] == full_result["timings"]["train_s"]
  assert [s for s, _ in resumed["train_loss"]] == list(range(STEPS))
  assert _losses(resumed) == _losses(full_result)  # exact float equality
  assert [tuple(v) for v in resumed["val_loss"]] == [tuple(v) for v in full_result["val_loss"]]
  a, b = _arrays(full_dir, STEPS), _arrays(out, STEPS)
  assert a.keys() == b.keys() and len(a) > 10
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  meta = json.loads((ckpt_lib.directory(out) / str(STEPS) / "meta" / "metadata").read_text())
  assert meta["step"] == STEPS and meta["run"]["optimizer"] == "muon"
  assert meta["run"]["model_config"]["model_dim"] == 32 and len(meta["run"]["data_sha256"]) == 64


def test_resume_through_the_cli_says_so(full, interrupted, tmp_path, capsys):
  out = tmp_path / "run"
  shutil.copytree(interrupted, out)
  assert cli.main(["train", *CLI_MICRO, "--checkpoint-every", "3", "--out", str(out),
                   "--resume"]) == 0
  assert "resumed from step 3" in capsys.readouterr().err
  res = json.loads((out / "results.json").read_text())["runs"][0]
  assert [l for _, l in res["train_loss"]] == _losses(full[0])


@pytest.mark.parametrize("change,fields", [
    (["--opt", "adamw"], ["--opt muon in the checkpoint, adamw now", "--lr"]),
    (["--model-dim", "64"], ["--model-dim 32 in the checkpoint, 64 now"]),
    (["--steps", "8", "--seed", "1"], ["--steps 6 in the checkpoint, 8 now",
                                       "--seed 0 in the checkpoint, 1 now"]),
    (["--data", "embedded:code"], ["--data embedded:prose in the checkpoint, embedded:code now",
                                   "--data (its contents)"]),
])
def test_resume_with_another_configuration_names_what_differs(change, fields, interrupted,
                                                              tmp_path, capsys):
  out = tmp_path / "run"
  shutil.copytree(interrupted, out)
  before = sorted(str(p) for p in out.rglob("*"))
  assert cli.main(["train", *CLI_MICRO, *change, "--out", str(out), "--resume"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("ortho-optax: error: --resume: "), err
  assert "step 3" in err
  for f in fields:
    assert f in err, (f, err)
  assert sorted(str(p) for p in out.rglob("*")) == before  # nothing written


def test_reporting_settings_may_change_on_resume(interrupted, tmp_path):
  cfg = _cfg(out_dir=str(interrupted), resume=True, log_every=1, eval_every=2,
             keep_checkpoints=5)
  dataset = train_lib.data_lib.load_dataset(cfg.data)
  _, start, history = train_lib.check_run(cfg, dataset)
  assert start == 3 and len(history["train_loss"]) == 3


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
  # Orbax's temporary folder of an interrupted first save is not a checkpoint.
  (tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1732780000").mkdir(parents=True)
  with pytest.raises(ValueError, match="no checkpoint in .* to resume"):
    train_lib.train(_cfg(out_dir=str(tmp_path), resume=True), progress=False)
  assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("damage", ["uncommitted", "missing_item"])
def test_an_unfinished_checkpoint_is_skipped_with_a_warning(damage, full, tmp_path):
  full_result, full_dir = full
  out = tmp_path / "run"
  shutil.copytree(full_dir / "checkpoints", out / "checkpoints")
  step6 = ckpt_lib.directory(out) / "6"
  if damage == "uncommitted":
    (step6 / "_CHECKPOINT_METADATA").unlink()
  else:
    shutil.rmtree(step6 / "state")
  with pytest.warns(RuntimeWarning, match="ignoring checkpoint .*6"):
    assert ckpt_lib.complete_steps(out) == [3]
  with pytest.warns(RuntimeWarning):
    resumed = train_lib.train(_cfg(out_dir=str(out), resume=True, checkpoint_every=0),
                              progress=False)
  assert resumed["resumed_from"] == 3
  assert _losses(resumed) == _losses(full_result)


def test_a_damaged_array_store_raises(interrupted, tmp_path):
  out = tmp_path / "run"
  shutil.copytree(interrupted, out)
  damaged = 0
  for p in (ckpt_lib.directory(out) / "3" / "state").rglob("*"):
    if p.is_file() and p.parent.name == "d":
      p.write_bytes(b"\0" * 8)  # same names, garbage content
      damaged += 1
  assert damaged
  with pytest.raises(ValueError, match="could not be read"):
    train_lib.train(_cfg(out_dir=str(out), resume=True), progress=False)


def test_a_damaged_checkpoint_through_the_cli_is_one_line(interrupted, tmp_path, capsys):
  out = tmp_path / "run"
  shutil.copytree(interrupted, out)
  for p in (ckpt_lib.directory(out) / "3" / "state").rglob("*"):
    if p.is_file() and p.parent.name == "d":
      p.write_bytes(b"\0" * 8)
  assert cli.main(["train", *CLI_MICRO, "--checkpoint-every", "3", "--out", str(out),
                   "--resume"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("ortho-optax: error: checkpoint ") and "could not be read" in err[-1]
  assert "Delete that folder to resume from the checkpoint before it" in err[-1]
  assert not any("Traceback" in line for line in err)


def test_resuming_a_finished_run_keeps_its_results(full, tmp_path, capsys):
  out = tmp_path / "run"
  shutil.copytree(full[1], out)
  before = (out / "results.json").read_text()
  result = train_lib.train(_cfg(out_dir=str(out), resume=True), progress=False)
  assert "already at step 6 of 6: nothing to train" in capsys.readouterr().err
  assert (out / "results.json").read_text() == before
  assert result["timings"] == json.loads(before)["runs"][0]["timings"]


def test_config_differences_lists_model_fields():
  from ortho_optax.models import config  # pylint: disable=import-outside-toplevel
  a = {"optimizer": "muon", "model_config": {"model_dim": 32, "num_heads": 2}}
  b = {"optimizer": "adamw", "model_config": {"model_dim": 64, "num_heads": 2}}
  assert config.differences(a, b) == [("model_dim", 32, 64), ("optimizer", "muon", "adamw")]
  assert config.differences(a, a) == []


def test_trainer_is_bit_deterministic(full, tmp_path):
  full_result, full_dir = full
  again = train_lib.train(_cfg(out_dir=str(tmp_path)), progress=False)
  assert _losses(again) == _losses(full_result)
  a, b = _arrays(full_dir, STEPS), _arrays(tmp_path, STEPS)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  other = train_lib.train(_cfg(seed=1, checkpoint_every=0), progress=False)
  assert _losses(other) != _losses(full_result)


def test_a_checkpoint_of_another_state_layout_names_the_entries(tmp_path):
  # Same configuration, other code (e.g. an older ortho-optax whose optimizer state had
  # other entries): the error names them instead of orbax's tree dump.
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  saved = nnx.State({"model": {"w": jnp.ones(3)}, "opt": {"mu": jnp.zeros(3)}})
  ck = ckpt_lib.Checkpoints(tmp_path)
  ck.save(1, saved, {"step": 1})
  ck.close()
  ck = ckpt_lib.Checkpoints(tmp_path)
  like = nnx.State({"model": {"w": jnp.ones(3)}, "opt": {"0": {"mu": jnp.zeros(3)}}})
  with pytest.raises(ValueError, match=r"another state layout.*\['opt/mu'\].*\['opt/0/mu'\]"):
    ck.restore(1, like)
  restored = ck.restore(1, saved)  # the same layout restores
  np.testing.assert_array_equal(restored["model"]["w"], 1.0)
  ck.close()
