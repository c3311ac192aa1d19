"""The ``ortho-optax`` command as a user meets it: bad values, help, outputs, header.

Every bad value ends the command before anything is trained or written, with one line
``ortho-optax: error: ...`` naming the flag, the value and what is allowed, and exit
status 2 (no traceback, no usage block).
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from ortho_optax.models import cli

MICRO = ["--num-layers", "1", "--model-dim", "32", "--num-heads", "2", "--seq-len", "16",
         "--batch-size", "4", "--data", "embedded:prose", "--no-progress", "--eval-batches", "1"]

# (command line, words the one-line message must contain)
BAD = [
    ("train --log-every 0", ["--log-every", "0", ">= 1"]),
    ("train --eval-batches 0", ["--eval-batches", "0", ">= 1"]),
    ("train --eval-every -1", ["--eval-every", "-1", ">= 0"]),
    ("train --checkpoint-every -1", ["--checkpoint-every", "-1", ">= 0"]),
    ("train --steps 0", ["--steps", "0", ">= 1"]),
    ("train --batch-size 0", ["--batch-size", "0", ">= 1"]),
    ("train --seed -1", ["--seed", "-1"]),
    ("train --lr -0.01", ["--lr", "-0.01", "(0.0, inf)"]),
    ("train --lr nan", ["--lr", "nan", "(0.0, inf)"]),
    ("train --lr inf", ["--lr", "inf", "(0.0, inf)"]),
    ("train --adam-lr -1", ["--adam-lr", "-1", "(0.0, inf)"]),
    ("train --weight-decay -1", ["--weight-decay", "-1"]),
    ("train --warmup 1000", ["--warmup", "1000", "--steps"]),
    ("train --warmup 2.5", ["--warmup", "2.5", "whole number"]),
    ("train --final-lr-frac 2", ["--final-lr-frac", "2", "[0.0, 1.0]"]),
    ("compare --lr muon=-0.01", ["--lr muon", "-0.01", "(0.0, inf)"]),
    ("compare --lr muon=abc", ["--lr", "muon=abc", "not a number"]),
    ("compare --lr muon", ["--lr", "NAME=LR"]),
    ("compare --lr sgd=0.1", ["--lr sgd=0.1", "not an optimizer", "muon"]),
    ("compare --lr-mults -1", ["--lr-mults", "-1", "(0.0, inf)"]),
    ("compare --lr-mults 0", ["--lr-mults", "0", "(0.0, inf)"]),
    ("train --opt sgdx", ["--opt", "sgdx", "muon"]),
    ("compare --opt adamw sgdx", ["--opt", "sgdx", "muon"]),
    ("train --model-dim -1", ["--model-dim", "-1", ">= 1"]),
    ("train --model-dim 130", ["--model-dim", "130", "--num-heads"]),
    ("train --opt muon --opt-arg momentum=2", ["--opt-arg momentum=2", "momentum", "[0.0, 1.0)"]),
    ("train --opt-arg nesterov", ["--opt-arg", "nesterov", "key=value"]),
    ("train --opt-arg foo=1", ["--opt-arg foo=1", "'foo'"]),
    ("train --resume", ["--resume", "--out"]),
    ("train --mesh-data 3", ["--mesh-data 3", "device"]),
    ("train --data text:{tmp}", ["--data", "folder", "*.txt"]),
    ("train --data text:{tmp}/nothing*", ["--data", "no file matches"]),
    ("train --data shards:{tmp}/nothing*", ["--data", "no file matches"]),
    ("train --data nonsense", ["--data", "nonsense", "embedded"]),
    ("train --preset huge", ["--preset", "huge", "tiny"]),
    ("train --vocab-size 100", ["--data", "256", "--vocab-size"]),
    ("train --seq-len 500000", ["--data", "training split", "--seq-len", "500000"]),
    ("train --stop-after 0", ["--stop-after", "0", ">= 1"]),
    ("train --steps 5 --stop-after 9", ["--stop-after=9", "--steps=5", "never stop"]),
    ("train --ortho-sharding auto", ["--ortho-sharding auto", "no", "--mesh-data"]),
    ("train --init-timeout 5", ["--init-timeout", "only with --multihost"]),
    ("train --init-timeout 5 --heartbeat-timeout 5", ["--init-timeout and --heartbeat-timeout",
                                                      "only with --multihost"]),
    ("train --multihost --init-timeout 0", ["--init-timeout", "0", ">= 1"]),
    ("train --multihost --heartbeat-timeout -1", ["--heartbeat-timeout", "-1", ">= 1"]),
    ("bogus", ["invalid choice", "train"]),
    ("compare --opt adamw muon --lr aurora=0.1", ["--lr aurora=0.1", "not among",
                                                   "--opt adamw muon"]),
    ("compare --opt muon muon", ["--opt", "muon given more than once"]),
    ("compare --lr-mults 1 1", ["--lr-mults", "1.0 given more than once"]),
    ("compare --opt muon --lr muon=0.1 --lr muon=0.2", ["--lr", "muon given more than once",
                                                         "one learning rate per optimizer"]),
    ("train --out=", ["--out is empty", "give a folder"]),
    ("compare --out=", ["--out is empty", "give a folder"]),
    ("train --out {tmp}/afile", ["--out", "afile is a file, not a folder"]),
    ("compare --out {tmp}/afile/sub", ["--out", "afile is a file, not a folder"]),
    ("train --attention cudnn", ["--attention cudnn", "NVIDIA GPU", "cpu", "auto or xla"]),
    ("train --dtype float16", ["--dtype float16", "CPU", "bfloat16 or float32"]),
]


@pytest.mark.parametrize("line,words", BAD, ids=[b[0] for b in BAD])
def test_bad_value_is_one_line_exit_2_and_writes_nothing(line, words, tmp_path, monkeypatch,
                                                         capsys):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "afile").write_text("")  # for the --out lines: a file where a folder must be
  argv = line.format(tmp=tmp_path).split()
  try:
    # The bad value comes after the micro settings, so it is the one argparse keeps.
    rc = cli.main(argv[:1] + (MICRO if argv[0] in ("train", "compare") else []) + argv[1:])
  except SystemExit as e:  # argparse's own errors
    rc = e.code
  out, err = capsys.readouterr()
  assert rc == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("ortho-optax: error: "), err
  for w in words:
    assert w in lines[0], (w, lines[0])
  assert "Traceback" not in err and "usage:" not in err and out == ""
  assert sorted(os.listdir(tmp_path)) == ["afile"], "nothing is written"


def test_batch_size_the_mesh_does_not_divide(tmp_path):
  # Two fake CPU devices: --mesh-data 2 splits the batch in two.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run([sys.executable, "-m", "ortho_optax", "train", "--mesh-data", "2",
                         "--batch-size", "3", "--no-progress"], capture_output=True, text=True,
                        timeout=300, cwd=tmp_path, env=env)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines() == [
      "ortho-optax: error: --batch-size=3 must be divisible by the 2 devices the batch is "
      "split over (--mesh-data 2 x --mesh-fsdp 1)."]
  assert os.listdir(tmp_path) == []


def test_an_output_folder_of_another_run_is_kept(tmp_path, capsys):
  (tmp_path / "results.json").write_text("{}")
  assert cli.main(["train", *MICRO, "--out", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert "--out" in err and "already holds a run" in err and "--resume" in err
  assert (tmp_path / "results.json").read_text() == "{}"
  assert sorted(os.listdir(tmp_path)) == ["results.json"]


def test_help_shows_defaults_and_examples():
  parser = cli.build_parser()
  top = parser.format_help()
  assert "examples:" in top and "ortho-optax compare --opt adamw muon" in top
  sub = parser._subparsers._group_actions[0].choices  # pylint: disable=protected-access
  text = sub["compare"].format_help()
  assert "(default: 250" not in text  # the steps default depends on the command: explained
  assert "--log-every LOG_EVERY" in text and "(default: 10)" in text
  assert "(default: cosine)" in text and "(default: embedded)" in text
  assert "runs/<command>-" in " ".join(text.split()) and "examples:" in text
  assert "(default: 0)" in sub["train"].format_help()  # --checkpoint-every


def test_commands_without_out_write_under_runs(tmp_path, monkeypatch, capsys):
  """The README's promise: the table printed, and JSON, PNG and Markdown under runs/."""
  monkeypatch.chdir(tmp_path)
  sweep = ["--opt", "adamw", "--lr", "adamw=0.004", "--lr-mults", "0.5", "1"]
  for command, opts in (("compare", sweep), ("train", ["--opt", "muon"])):
    assert cli.main([command, *MICRO, *opts, "--steps", "3"]) == 0
    out = capsys.readouterr().out
    (folder,) = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith(command + "-")]
    assert len(folder.name) == len(command) + len("-20261201-101500")
    assert sorted(os.listdir(folder)) == ["loss.png", "results.json", "results.md"]
    assert f"results: runs/{folder.name}/" in out.splitlines()[-1]
    head = out.split("\n| optimizer")[0]
    runs_shown = "adamw lr=0.002, adamw lr=0.004" if command == "compare" else "muon lr=0.06"
    for word in ("ortho-optax " + command, "tiny", "embedded:prose", "sha256", "cpu",
                 "3 x 4 x 16 tokens", runs_shown, f"runs/{folder.name}"):
      assert word in head, (word, head)
    import jax  # pylint: disable=import-outside-toplevel
    assert "  device     1 x " in head  # no mesh flag: one device, whatever is visible
    assert (f"of {jax.device_count()} visible" in head) == (jax.device_count() > 1)
    assert "| train s | ms / step | compile s |" in out
    results = json.loads((folder / "results.json").read_text())
    runs = results["runs"]
    assert (folder / "loss.png").stat().st_size > 1000
    assert "| train s | ms / step | compile s |" in (folder / "results.md").read_text()
    if command == "compare":
      assert sorted(r["config"]["lr"] for r in runs) == [0.002, 0.004]
      assert "| adamw | 0.004 |" in out and "| adamw | 0.002 |" in out
      assert results["best"]["adamw"]["lr"] in (0.002, 0.004)
    else:
      assert "best" not in results  # one run: nothing was swept
    for r in runs:
      t = r["timings"]
      assert t["compile_s"] > 0 and t["train_s"] > 0 and t["steps_timed"] == 3
      assert t["step_s"] == pytest.approx(t["train_s"] / 3)
      assert len(r["train_loss"]) == 3


def test_a_run_that_fails_in_a_job_of_several_processes_ends_the_process_at_once(
    tmp_path, monkeypatch, capsys):
  """In a job of several processes a failed run (a collective that failed because another
  process died) prints its traceback and one line, then exits at once with 1: a normal
  exit would wait in JAX's shutdown barrier for the dead process. One process: it raises."""
  import jax  # pylint: disable=import-outside-toplevel
  from ortho_optax.models import train as train_lib  # pylint: disable=import-outside-toplevel

  def failing_train(*args, **kwargs):
    raise RuntimeError("Gloo AllGather failed: Connection reset by peer\n(more)")

  def exit_now(code):
    raise SystemExit(f"os._exit({code})")

  monkeypatch.setattr(train_lib, "train", failing_train)
  monkeypatch.setattr(cli.os, "_exit", exit_now)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  argv = ["train", *MICRO, "--steps", "2", "--out", str(tmp_path / "run")]
  with pytest.raises(SystemExit, match=r"os\._exit\(1\)"):
    cli.main(argv)
  err = capsys.readouterr().err
  assert "Traceback" in err
  assert err.strip().splitlines()[-1].startswith(
      "ortho-optax: error: process 1 of 2 stopped mid-run (RuntimeError: Gloo AllGather "
      "failed: Connection reset by peer); "), err
  monkeypatch.setattr(jax, "process_count", lambda: 1)
  with pytest.raises(RuntimeError, match="Connection reset by peer"):
    cli.main(argv)


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
  from ortho_optax.models import train as train_lib

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(train_lib, "train", interrupted)
  assert cli.main(["train", *MICRO, "--steps", "3", "--out", str(tmp_path / "r")]) == 130
  err = capsys.readouterr().err
  assert "ortho-optax: interrupted; no checkpoint was saved (--checkpoint-every N" in err
  assert "Traceback" not in err
