"""Several JAX processes on one machine: the multi-host path run for real.

Two processes with four fake CPU devices each join one job on loopback
(``tests/_mp/launch.py``); ``distribute(tx, mesh)`` over the global 8-device mesh must give
what one process with 8 devices and the undistributed optimizer give, and the HLO must
show that all-to-alls, not gathers of whole parameters, move the matrices between the
processes. ``ortho-optax train --multihost`` as 2 processes must give the losses of one
process with 8 devices, with the reports written by process 0 alone, checkpoints written by
both, a resumed run equal to an uninterrupted one and each process reading only its own
rows of a batch; a killed process ends the job, leaving only whole checkpoints; a job that
cannot form ends after ``--init-timeout`` with one line. The tests skip (saying why) where
the platform cannot run such a job.
"""

import json
import math
import os
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from _mp import hlo, launch, scenarios
from ortho_optax import distributed

SKIP = launch.skip_reason()
needs_processes = pytest.mark.skipif(SKIP is not None, reason=str(SKIP))

# Compiling is most of a job's time on the CPU. LLVM's optimisation level changes no
# result beyond float32 rounding (what the comparisons allow) and halves it.
FAST_COMPILE = ("--xla_backend_optimization_level=0",)
#: Bound of one job (a hang guard: a job takes ~5 s to start, the compiles the rest).
TIMEOUT_S = 180


class Job:
  """What the ``gather_whole`` scenario of one job wrote."""

  def __init__(self, out_dir):
    with open(os.path.join(out_dir, "gather_whole.json")) as f:
      self.meta = json.load(f)
    with np.load(os.path.join(out_dir, "params.npz")) as z:
      self.arrays = {k: z[k] for k in z.files}
    self.hlo = {}
    for name in os.listdir(out_dir):
      if name.endswith(".hlo.txt"):
        with open(os.path.join(out_dir, name)) as f:
          self.hlo[name[:-len(".hlo.txt")]] = f.read()

  def params(self, cid):
    """``{leaf path: array}`` of one run (``cid`` may be ``"<case>/undistributed"``)."""
    prefix = cid + "/"
    return {k[len(prefix):]: v for k, v in self.arrays.items()
            if k.startswith(prefix) and "/" not in k[len(prefix):]}

  def process_of(self, cid):
    """The process of each logical device id (``mesh.devices.flat`` order)."""
    return np.asarray(self.meta["cases"][cid]["process_index"]).ravel()


def _run(tmp_path_factory, num_processes, devices_per_process):
  def produce(out):
    launch.run_worker("gather_whole", out, num_processes=num_processes,
                      devices_per_process=devices_per_process, timeout=TIMEOUT_S,
                      xla_flags=FAST_COMPILE).check()
  return Job(launch.produce_once(tmp_path_factory, f"gather_whole-{num_processes}", produce))


# The jobs are the slow part: launch.produce_once runs each once per session, also when
# pytest-xdist spreads this module's tests over several workers.


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  """The ``gather_whole`` scenario as 2 processes x 4 CPU devices."""
  return _run(tmp_path_factory, 2, 4)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  """The same scenario as 1 process x 8 CPU devices, with the undistributed results (run
  like the 2-process job, with the same compiler flags)."""
  return _run(tmp_path_factory, 1, 8)


def _crossing(collective, process_of):
  """Whether some device group of ``collective`` spans more than one process."""
  return any(len({process_of[i] for i in g}) > 1 for g in collective.groups)


@needs_processes
def test_two_processes_form_one_job_with_cpu_collectives():
  with tempfile.TemporaryDirectory(prefix="ortho_optax_mp_out_") as out:
    launch.run_worker("smoke", out, timeout=60).check()
    with open(os.path.join(out, "smoke.json")) as f:
      smoke = json.load(f)
  assert smoke == {"process_count": 2, "device_count": 8, "local_device_count": 4,
                   "process_indices": [0, 1], "sum": float(sum(range(8))),
                   "cpu_collectives": "gloo"}


@needs_processes
@pytest.mark.parametrize("cid", [r[0] for r in scenarios.RUNS])
def test_gather_whole_across_processes_matches_one_process(two_processes, one_process, cid):
  assert two_processes.meta["process_count"] == 2 and one_process.meta["process_count"] == 1
  multi = two_processes.params(cid)
  single = one_process.params(cid)
  undistributed = one_process.params(cid + "/undistributed")
  assert multi and multi.keys() == single.keys() == undistributed.keys()
  for key, value in multi.items():
    np.testing.assert_allclose(value, single[key], rtol=1e-5, atol=1e-6,
                               err_msg=f"{cid} {key}: 2 processes vs 1 process")
    np.testing.assert_allclose(value, undistributed[key], rtol=1e-5, atol=1e-6,
                               err_msg=f"{cid} {key}: 2 processes vs undistributed")
  # The matrices went between the processes: all-to-alls whose groups span both.
  process_of = two_processes.process_of(cid)
  assert sorted(set(process_of.tolist())) == [0, 1]
  all_to_alls = [c for c in hlo.collectives(two_processes.hlo[cid], 8)
                 if c.op == "all-to-all"]
  assert all_to_alls and all(_crossing(c, process_of) for c in all_to_alls), all_to_alls


@needs_processes
def test_all_to_all_not_a_gather_of_whole_parameters_moves_the_data(two_processes,
                                                                   one_process):
  """FSDP over both processes (1x8), every matrix sharded: only all-to-alls move bytes,
  and each device sends/receives 2/8 of the parameters, not whole parameters."""
  text = two_processes.hlo["divisible"]
  process_of = two_processes.process_of("divisible")
  moving = [c for c in hlo.collectives(text, 8) if any(len(g) > 1 for g in c.groups)]
  assert moving and {c.op for c in moving} == {"all-to-all"}, [c.line for c in moving]
  assert all(_crossing(c, process_of) for c in moving)
  # Bytes per device (loops counted by trip count): one all-to-all of the local shard in
  # (slices of every matrix -> whole matrices) and one out: 2 x (all matrices / 8).
  whole = sum(math.prod(s) * 4 for s in jax.tree.leaves(
      scenarios.DIVISIBLE_SHAPES, is_leaf=lambda x: isinstance(x, tuple)))
  bench = hlo.load_bench_distributed()
  moved = bench.collective_bytes(text)
  assert moved["all-to-all"] == moved["total"] == 2 * whole // 8, (moved, whole)
  # The same update left to XLA's partitioner moves the matrices with other
  # collectives, and more bytes: the checks above can fail.
  auto = bench.collective_bytes(one_process.hlo["divisible-auto"])
  assert auto["all-to-all"] == 0 and auto["total"] > moved["total"], auto


# ---------------------------------------------------------------------------------------
# The launcher itself: bounded time, the whole process group cleaned up.
# ---------------------------------------------------------------------------------------


@needs_processes
def test_a_failing_process_ends_the_job_without_waiting_for_its_timeout():
  """Process 1 raises while process 0 waits for it in a collective: the worker exits at
  once (no shutdown barrier) and the launcher stops process 0 after the grace period."""
  with tempfile.TemporaryDirectory(prefix="ortho_optax_mp_out_") as out:
    result = launch.run_worker("fail_on_process_1", out, timeout=120, grace=1.0)
  assert not result.timed_out and result.wall_s < 60, result.report()
  assert [p.returncode for p in result.processes] == [None, 1], result.report()
  assert "scenario failed on purpose" in result.processes[1].stderr

# Each process starts a grandchild (``sleep``), prints its pid, then sleeps or exits.
_SPAWN = ("import os, subprocess, sys, time\n"
          "child = subprocess.Popen(['sleep', '300'])\n"
          "print(child.pid, flush=True)\n"
          "if os.environ['JAX_PROCESS_ID'] == os.environ.get('FAIL_ID'): sys.exit(3)\n"
          "time.sleep(300)\n")


def _gone(pid, within_s=10.0):
  """True once ``pid`` no longer runs (a zombie waiting for its reaper counts as gone)."""
  deadline = time.monotonic() + within_s
  while time.monotonic() < deadline:
    try:
      with open(f"/proc/{pid}/stat") as f:
        if f.read().split(")")[-1].split()[0] == "Z":
          return True
    except FileNotFoundError:
      return True
    except OSError:
      try:
        os.kill(pid, 0)
      except ProcessLookupError:
        return True
    time.sleep(0.05)
  return False


@pytest.mark.skipif(os.name != "posix", reason="process groups are POSIX")
def test_launch_kills_every_process_group_on_timeout():
  start = time.monotonic()
  result = launch.launch([sys.executable, "-c", _SPAWN], num_processes=2, timeout=3)
  assert time.monotonic() - start < 15
  assert result.timed_out and not result.ok
  assert [p.returncode for p in result.processes] == [None, None]
  with pytest.raises(AssertionError, match="TIMED OUT"):
    result.check()
  for p in result.processes:
    assert _gone(int(p.stdout.split()[0])), p  # the grandchild went with its group


@pytest.mark.skipif(os.name != "posix", reason="process groups are POSIX")
def test_launch_stops_the_peers_of_a_failed_process():
  start = time.monotonic()
  result = launch.launch([sys.executable, "-c", _SPAWN], num_processes=2, timeout=60,
                         env={"FAIL_ID": "1"})
  assert time.monotonic() - start < launch.GRACE_S + 10
  assert not result.timed_out
  assert [p.returncode for p in result.processes] == [None, 3]
  for p in result.processes:
    assert _gone(int(p.stdout.split()[0])), p
  with pytest.raises(AssertionError, match="process 1: returncode 3"):
    result.check()


def test_process_environment():
  env = launch.process_env(1, 2, 4, "127.0.0.1:1234", {"A": "b"}, ("--xla_dump_to=/x",))
  assert env["JAX_PLATFORMS"] == "cpu" and env["A"] == "b"
  assert (env["JAX_COORDINATOR_ADDRESS"], env["JAX_NUM_PROCESSES"],
          env["JAX_PROCESS_ID"]) == ("127.0.0.1:1234", "2", "1")
  flags = env["XLA_FLAGS"].split()
  assert flags.count("--xla_force_host_platform_device_count=4") == 1
  assert not any(f.endswith("=8") for f in flags if "device_count" in f)
  assert flags[-1] == "--xla_dump_to=/x"
  assert env["PYTHONPATH"].split(os.pathsep)[0] == str(launch.ROOT)


def test_replica_groups_formats():
  assert hlo.replica_groups("replica_groups=mesh['data'=4,'fsdp'=2] {'fsdp'}", 8) == [
      [0, 1], [2, 3], [4, 5], [6, 7]]
  assert hlo.replica_groups("replica_groups=mesh['data'=4,'fsdp'=2] {'data'}", 8) == [
      [0, 2, 4, 6], [1, 3, 5, 7]]
  assert hlo.replica_groups("replica_groups=mesh['a'=2,'b'=2] {'a','b'}", 4) == [
      [0, 1, 2, 3]]
  # Older XLA (JAX 0.10): the mesh positions' device ids follow the mesh.
  assert hlo.replica_groups("replica_groups=mesh['a'=2,'b'=1,'c'=4], "
                            "device_ids=([4,2]T(1,0)) {'a'}, x", 8) == [
      [0, 1], [2, 3], [4, 5], [6, 7]]
  assert hlo.replica_groups("replica_groups=mesh['a'=2,'b'=2], device_ids=(3,2,1,0) {'b'}",
                            4) == [[3, 2], [1, 0]]
  assert hlo.replica_groups("replica_groups={{0,2},{1,3}}, x", 4) == [[0, 2], [1, 3]]
  assert hlo.replica_groups("replica_groups={}, x", 4) == [[0, 1, 2, 3]]
  assert hlo.replica_groups("replica_groups=[4,2]<=[8], x", 8) == [
      [0, 1], [2, 3], [4, 5], [6, 7]]
  assert hlo.replica_groups("replica_groups=[2,4]<=[4,2]T(1,0), x", 8) == [
      [0, 2, 4, 6], [1, 3, 5, 7]]
  assert hlo.replica_groups("source_target_pairs={{0,1},{1,0}}", 2) == [[0, 1], [1, 0]]
  with pytest.raises(ValueError, match="cannot read"):
    hlo.replica_groups("all-gather(x), dimensions={0}", 8)


# ---------------------------------------------------------------------------------------
# initialize_multiprocess / configure_cpu_collectives (no job needed)
# ---------------------------------------------------------------------------------------


def test_initialize_multiprocess_rejects_bad_arguments_before_touching_jax(monkeypatch):
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two'"):
    distributed.initialize_multiprocess()
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "2")
  with pytest.raises(ValueError, match="process_id=2 must be < num_processes=2"):
    distributed.initialize_multiprocess()
  with pytest.raises(ValueError, match="num_processes must be an int >= 1"):
    distributed.initialize_multiprocess(num_processes=0, process_id=0)
  with pytest.raises(ValueError, match="initialization_timeout"):
    distributed.initialize_multiprocess(num_processes=2, process_id=0,
                                        initialization_timeout=0)
  with pytest.raises(ValueError, match="implementation='nccl'"):
    distributed.initialize_multiprocess(num_processes=2, process_id=0,
                                        cpu_collectives="nccl")
  assert not jax.distributed.is_initialized()


def test_configure_cpu_collectives_after_backends_started(monkeypatch):
  jax.devices()  # this process's backends are up (conftest's 8 devices)
  in_effect = jax.config.jax_cpu_collectives_implementation
  assert distributed.configure_cpu_collectives(in_effect) == in_effect  # a no-op
  other = next(c for c in distributed.CPU_COLLECTIVES if c != in_effect)
  with pytest.raises(RuntimeError, match="must run before JAX initialises its backends"):
    distributed.configure_cpu_collectives(other)
  monkeypatch.setenv("JAX_CPU_COLLECTIVES_IMPLEMENTATION", "smoke-signals")
  with pytest.raises(ValueError, match="JAX_CPU_COLLECTIVES_IMPLEMENTATION='smoke-signals'"):
    distributed.configure_cpu_collectives()
  assert jax.config.jax_cpu_collectives_implementation == in_effect


# ---------------------------------------------------------------------------------------
# The trainer: `ortho-optax train --multihost` as 2 processes x 4 CPU devices
# ---------------------------------------------------------------------------------------

TRAIN_JOB = os.path.join(os.path.dirname(launch.WORKER), "train_job.py")
#: Seconds without a heartbeat after which JAX ends the job (JAX's default is 100).
HEARTBEAT_S = 10


def _train_argv(out, *extra, multihost=True):
  """A micro run of the tiny preset on the 4 x 2 (data x fsdp) mesh, checkpointed at steps
  2 and 4, validated at steps 2 and 4 (one batch)."""
  job = (["--multihost", "--init-timeout", "60", "--heartbeat-timeout", str(HEARTBEAT_S)]
         if multihost else [])
  return (["train", *job, "--preset", "tiny", "--opt", "muon", "--mesh-data", "4",
           "--mesh-fsdp", "2", "--num-layers", "1", "--model-dim", "32", "--num-heads", "2",
           "--seq-len", "16", "--batch-size", "8", "--steps", "4", "--warmup", "0",
           "--data", "embedded:prose", "--eval-every", "2", "--eval-batches", "1",
           "--log-every", "2", "--checkpoint-every", "2", "--no-progress", "--out", str(out)]
          + list(extra))


class TrainJob:
  """What the processes of one ``train_job.py`` launch left: their records, the runs'
  output folders and the launch itself (``launch.json``)."""

  def __init__(self, root):
    self.root = str(root)
    self.result = launch.LaunchResult.load(os.path.join(self.root, "launch.json"))
    self.records = []
    for p in self.result.processes:
      path = os.path.join(root, "records", f"process-{p.process_id}.json")
      with open(path) as f:
        self.records.append(json.load(f))

  def out(self, name):
    return os.path.join(self.root, name)

  def results(self, name):
    with open(os.path.join(self.root, name, "results.json")) as f:
      return json.load(f)["runs"][0]


def _train_job(root, runs, num_processes, kill=None, grace=launch.GRACE_S):
  """Launches ``train_job.py`` with ``runs`` (``_train_argv(root)`` -> argv) in ``root``."""
  os.makedirs(os.path.join(root, "records"))
  env = {"ORTHO_OPTAX_MP_KILL": kill} if kill else {}
  # One compilation of the step for all runs of a process (they compile the same program).
  env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(root, "jax-cache")
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  result = launch.launch([sys.executable, TRAIN_JOB, os.path.join(root, "records"),
                          json.dumps(runs(str(root)))], num_processes=num_processes,
                         devices_per_process=8 // num_processes, timeout=TIMEOUT_S,
                         env=env, xla_flags=FAST_COMPILE, grace=grace)
  result.save(os.path.join(root, "launch.json"))


@pytest.fixture(scope="module")
def trainer_job(tmp_path_factory):
  """One 2-process launch, four runs in order: ``full`` (4 steps); ``resumed`` stopped
  after step 2 (``--stop-after``), then ``--resume``d; ``killed``, checkpointing every
  step in the background, whose process 1 is killed right after it started the
  checkpoint of step 3."""
  def runs(root):
    return [_train_argv(os.path.join(root, "full")),
            _train_argv(os.path.join(root, "resumed"), "--stop-after", "2"),
            _train_argv(os.path.join(root, "resumed"), "--resume"),
            _train_argv(os.path.join(root, "killed"), "--checkpoint-every", "1",
                        "--async-checkpoints")]
  return TrainJob(launch.produce_once(tmp_path_factory, "trainer-2", lambda root: _train_job(
      root, runs, 2, kill="3:1:3", grace=6 * HEARTBEAT_S)))


@pytest.fixture(scope="module")
def trainer_reference(tmp_path_factory):
  """The ``full`` run as 1 process x 8 CPU devices (no ``--multihost``)."""
  def runs(root):
    return [_train_argv(os.path.join(root, "full"), multihost=False)]
  job = TrainJob(launch.produce_once(tmp_path_factory, "trainer-1",
                                     lambda root: _train_job(root, runs, 1)))
  assert job.result.ok and job.records[0]["returncodes"] == [0], job.result.report()
  return job


def _checkpoint_arrays(out_dir, step):
  """The arrays of a checkpoint by path, as numpy (its devices are not this process's)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from ortho_optax.models import checkpoints as ckpt_lib  # pylint: disable=import-outside-toplevel
  path = ckpt_lib.directory(out_dir) / str(step) / "state"
  with ocp.PyTreeCheckpointer() as checkpointer:
    meta = checkpointer.metadata(path)
    meta = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    tree = checkpointer.restore(path, restore_args=as_numpy)
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _good_runs(job):
  """The three runs before the killed one ended with 0 in both processes."""
  assert [r["returncodes"][:3] for r in job.records] == [[0, 0, 0]] * 2, job.result.report()


@needs_processes
def test_trainer_across_two_processes_matches_one_process(trainer_job, trainer_reference):
  _good_runs(trainer_job)
  multi, single = trainer_job.results("full"), trainer_reference.results("full")
  assert multi["completed_steps"] == single["completed_steps"] == 4
  for key in ("train_loss", "val_loss"):
    steps = [s for s, _ in multi[key]]
    assert steps == [s for s, _ in single[key]] and steps, key
    np.testing.assert_allclose([l for _, l in multi[key]], [l for _, l in single[key]],
                               rtol=1e-5, err_msg=key)


@needs_processes
def test_trainer_only_process_0_writes_reports_both_write_checkpoints(trainer_job):
  _good_runs(trainer_job)
  assert [r["reports_written"] for r in trainer_job.records] == [3, 0]
  out = trainer_job.out("full")
  assert sorted(os.listdir(out)) == ["checkpoints", "loss.png", "results.json", "results.md"]
  assert trainer_job.results("full")["completed_steps"] == 4  # one writer: valid JSON
  for step in (2, 4):  # each process wrote the shards it holds
    state = os.path.join(out, "checkpoints", str(step), "state")
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state)), step


@needs_processes
def test_trainer_resumed_across_two_processes_reproduces_the_uninterrupted_run(trainer_job):
  _good_runs(trainer_job)
  full, resumed = trainer_job.results("full"), trainer_job.results("resumed")
  assert resumed["resumed_from"] == 2 and resumed["completed_steps"] == 4
  assert resumed["train_loss"] == full["train_loss"]
  assert resumed["val_loss"] == full["val_loss"]
  a, b = _checkpoint_arrays(trainer_job.out("full"), 4), _checkpoint_arrays(
      trainer_job.out("resumed"), 4)
  assert a.keys() == b.keys() and a
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert "resumed from step 2" in trainer_job.result.processes[0].stderr


@needs_processes
def test_trainer_processes_read_only_their_own_rows_of_each_batch(trainer_job):
  _good_runs(trainer_job)
  rows = [r["rows"] for r in trainer_job.records]
  batches = [k for k in rows[0] if k.startswith("0:")]  # the full run's batches
  # Inputs and targets of the 4 training batches and of the validation batch (the same
  # windows at both evaluations).
  assert len(batches) == 2 * (4 + 1), batches
  assert set(batches) == {k for k in rows[1] if k.startswith("0:")}
  for key in batches:
    size = int(key.split(":")[2])
    mine, theirs = set(rows[0][key]), set(rows[1][key])
    assert len(mine) == len(theirs) == size // 2, key
    assert mine | theirs == set(range(size)), key


@needs_processes
def test_trainer_process_killed_mid_run_ends_the_job_and_leaves_whole_checkpoints(trainer_job):
  """Process 1 dies right after starting a background checkpoint: process 0 exits by
  itself, within about the heartbeat timeout, with an error; a checkpoint that was not
  finished is not one ``--resume`` would load, and the ones it would are whole."""
  import warnings  # pylint: disable=import-outside-toplevel
  from ortho_optax.models import checkpoints as ckpt_lib  # pylint: disable=import-outside-toplevel
  _good_runs(trainer_job)
  p0, p1 = trainer_job.result.processes
  assert p1.returncode == -9, trainer_job.result.report()
  # Process 0 ended itself (the launcher kills only after 6 heartbeat timeouts).
  assert p0.returncode not in (None, 0), trainer_job.result.report()
  assert ("ortho-optax: error: process 0 of 2 stopped mid-run" in p0.stderr
          or "heartbeat" in p0.stderr), p0.stderr[-3000:]
  assert trainer_job.records[0]["returncodes"] == [0, 0, 0]  # the killed run never returned
  killed = trainer_job.out("killed")
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no step folder that orbax never committed
    steps = ckpt_lib.complete_steps(killed)
  assert steps[:2] == [1, 2] and set(steps) <= {1, 2, 3}, steps
  if 3 not in steps:  # what was written of step 3 lies in orbax's temporary folder
    assert [n for n in os.listdir(ckpt_lib.directory(killed)) if n.startswith("3.")], (
        os.listdir(ckpt_lib.directory(killed)))
  assert not os.path.exists(os.path.join(killed, "results.json"))
  # What --resume would load is whole: step 2 equals the uninterrupted run's.
  a, b = _checkpoint_arrays(trainer_job.out("full"), 2), _checkpoint_arrays(killed, 2)
  assert a.keys() == b.keys() and a
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@needs_processes
@pytest.mark.parametrize("process_id", [0, 1])
def test_multihost_job_that_does_not_form_ends_with_one_line(process_id):
  """One process of a 2-process job started alone: process 0 waits for a peer that never
  comes, process 1 for a coordinator that is not there; both end after --init-timeout
  with one line and exit status 1."""
  argv = [sys.executable, "-m", "ortho_optax", "train", "--multihost", "--init-timeout", "2"]
  result = launch.launch(argv, num_processes=1, timeout=60,
                         env={"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(process_id)})
  (p,) = result.processes
  assert p.returncode == 1 and not result.timed_out, result.report()
  lines = p.stderr.strip().splitlines()
  assert lines[-1].startswith("ortho-optax: error: --multihost: "), p.stderr
  assert "--init-timeout 2 s" in lines[-1] and result.coordinator_address in lines[-1]
  assert result.wall_s < 40, result.wall_s
