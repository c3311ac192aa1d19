"""Starts N JAX processes on loopback, each with its own fake CPU devices.

The multi-host code path of JAX (``jax.distributed.initialize``, a coordinator, one
process per host, collectives between processes) runs on one machine too: each process
gets ``JAX_PLATFORMS=cpu`` and ``--xla_force_host_platform_device_count=K`` and the
coordinator listens on ``127.0.0.1`` at a free port. The processes read the standard
variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
(what :func:`ortho_optax.distributed.initialize_multiprocess` reads on a real cluster);
the CPU collectives are left to the code under test.

Every launch has a wall-time bound: when it passes, or when one process fails (its
peers would otherwise wait in a collective until their own timeouts), the remaining
processes are killed with their whole process group. Output goes to files in a
temporary folder (no pipe can fill up and block a child) and comes back in the result;
the folder is removed afterwards.

API::

  reason = skip_reason()                 # None, or why this platform cannot run it
  result = launch([sys.executable, "script.py", ...], num_processes=2,
                  devices_per_process=4, timeout=60, xla_flags=(), env={})
  result.check()                         # AssertionError with every process's output
  result.processes[0].stdout, result.processes[0].returncode  # None: killed
  # scenarios.<name>(out_dir) in every process, after initialize_multiprocess():
  run_worker("gather_whole", out_dir, num_processes=2, devices_per_process=4).check()
  folder = produce_once(tmp_path_factory, "job", produce)  # a fixture's work, once
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Mapping, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[2]  # the repository (worktree) root
WORKER = pathlib.Path(__file__).resolve().with_name("worker.py")
#: Seconds the peers of a failed process get to exit on their own before being killed.
GRACE_S = 5.0


@dataclasses.dataclass
class ProcessResult:
  process_id: int
  returncode: int | None  # None: killed by the launcher (timeout or a failed peer)
  stdout: str
  stderr: str


@dataclasses.dataclass
class LaunchResult:
  processes: list[ProcessResult]
  timed_out: bool
  wall_s: float
  coordinator_address: str

  @property
  def ok(self) -> bool:
    return not self.timed_out and all(p.returncode == 0 for p in self.processes)

  def report(self) -> str:
    head = (f"{len(self.processes)} processes, coordinator {self.coordinator_address}, "
            f"{self.wall_s:.1f} s{', TIMED OUT' if self.timed_out else ''}")
    parts = [head]
    for p in self.processes:
      parts.append(f"--- process {p.process_id}: returncode {p.returncode}\n"
                   f"[stdout]\n{p.stdout[-4000:]}\n[stderr]\n{p.stderr[-6000:]}")
    return "\n".join(parts)

  def check(self) -> "LaunchResult":
    """Raises ``AssertionError`` (with every process's output) unless all exited 0."""
    if not self.ok:
      raise AssertionError(self.report())
    return self

  def save(self, path: str | os.PathLike) -> None:
    pathlib.Path(path).write_text(json.dumps(dataclasses.asdict(self)))

  @classmethod
  def load(cls, path: str | os.PathLike) -> "LaunchResult":
    fields = json.loads(pathlib.Path(path).read_text())
    fields["processes"] = [ProcessResult(**p) for p in fields["processes"]]
    return cls(**fields)


def free_port() -> int:
  """A TCP port of 127.0.0.1 that was free a moment ago."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def skip_reason() -> str | None:
  """Why this platform cannot run multi-process CPU tests, or None when it can."""
  if os.name != "posix":
    return f"multi-process tests need POSIX process groups (os.name={os.name!r})"
  try:
    free_port()
  except OSError as e:
    return f"cannot bind a TCP port on 127.0.0.1: {e}"
  # pylint: disable=import-outside-toplevel
  try:
    from jax._src.lib import _jax as jaxlib_ext
  except ImportError:
    try:  # older jaxlib
      from jaxlib import xla_extension as jaxlib_ext  # type: ignore
    except ImportError as e:
      return f"cannot import jaxlib's extension to look for gloo: {e}"
  if not hasattr(jaxlib_ext, "make_gloo_tcp_collectives"):
    return "this jaxlib has no gloo CPU collectives (make_gloo_tcp_collectives)"
  return None


def _xla_flags(devices_per_process: int, extra: Sequence[str] = ()) -> str:
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                 os.environ.get("XLA_FLAGS", "")).split()
  flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
  return " ".join(flags + list(extra))


def process_env(process_id: int, num_processes: int, devices_per_process: int,
                coordinator_address: str, extra: Mapping[str, str] | None = None,
                xla_flags: Sequence[str] = ()) -> dict:
  """The environment of one process: CPU platform, K fake devices, the JAX_* variables."""
  env = dict(os.environ)
  pythonpath = [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
  env.update({
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": _xla_flags(devices_per_process, xla_flags),
      "JAX_COORDINATOR_ADDRESS": coordinator_address,
      "JAX_NUM_PROCESSES": str(num_processes),
      "JAX_PROCESS_ID": str(process_id),
      "PYTHONPATH": os.pathsep.join(pythonpath),
      "PYTHONUNBUFFERED": "1",
  })
  env.update(extra or {})
  return env


def _exit_status(proc: subprocess.Popen) -> int | None:
  """The exit code of ``proc`` if it has exited, else None, *without reaping it*: while
  the exited leader is an unreaped zombie its pid (the id of its process group) cannot
  be reused, so killing the group afterwards cannot hit an unrelated process."""
  if not hasattr(os, "waitid"):  # pragma: no cover - platforms without waitid
    return proc.poll()
  info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
  if info is None:
    return None
  return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def _kill_group(proc: subprocess.Popen) -> None:
  """SIGKILL to the process group ``proc`` leads (it and anything it started), then
  reaps ``proc``."""
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass  # the group is empty already
  proc.wait()


def launch(argv: Sequence[str], *, num_processes: int = 2, devices_per_process: int = 4,
           timeout: float = 60.0, env: Mapping[str, str] | None = None,
           per_process_env: Sequence[Mapping[str, str]] | None = None,
           xla_flags: Sequence[str] = (), grace: float = GRACE_S,
           cwd: str | os.PathLike | None = None) -> LaunchResult:
  """Runs ``argv`` as ``num_processes`` processes of one JAX job on loopback.

  Each process leads its own process group. The job ends when every process has
  exited, at ``timeout``, or ``grace`` seconds after a process exited non-zero; then every
  group is killed (what a process left running dies with it) and every process reaped.

  Args:
    argv: the command every process runs (e.g. ``[sys.executable, "script.py"]``).
    num_processes: how many processes (``JAX_NUM_PROCESSES``).
    devices_per_process: fake CPU devices per process.
    timeout: wall-time bound in seconds for the whole job.
    env: extra environment variables for every process.
    per_process_env: extra variables per process (a list of ``num_processes`` maps).
    xla_flags: flags appended to ``XLA_FLAGS`` (after the inherited ones and the
      device count).
    grace: seconds the peers of a failed process get to exit by themselves.
    cwd: working directory (default: the repository root).

  Returns:
    A :class:`LaunchResult`; a process the launcher killed has ``returncode=None``.
  """
  if per_process_env is not None and len(per_process_env) != num_processes:
    raise ValueError(f"per_process_env has {len(per_process_env)} entries, expected "
                     f"num_processes={num_processes}.")
  address = f"127.0.0.1:{free_port()}"
  procs: list[subprocess.Popen] = []
  files = []
  codes: dict[int, int | None] = {}
  timed_out = False
  start = time.monotonic()
  with tempfile.TemporaryDirectory(prefix="ortho_optax_mp_") as tmp:
    try:
      for i in range(num_processes):
        extra = dict(env or {})
        extra.update(per_process_env[i] if per_process_env else {})
        out = open(os.path.join(tmp, f"{i}.out"), "w+b")  # pylint: disable=consider-using-with
        err = open(os.path.join(tmp, f"{i}.err"), "w+b")  # pylint: disable=consider-using-with
        files.append((out, err))
        procs.append(subprocess.Popen(  # pylint: disable=consider-using-with
            list(argv), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
            env=process_env(i, num_processes, devices_per_process, address, extra,
                            xla_flags),
            cwd=str(cwd or ROOT), start_new_session=True))
      deadline = start + timeout
      failed_at = None
      while len(codes) < len(procs):
        for i, p in enumerate(procs):
          if i not in codes and (code := _exit_status(p)) is not None:
            codes[i] = code
            if code != 0 and failed_at is None:
              failed_at = time.monotonic()
        now = time.monotonic()
        if now >= deadline:
          timed_out = len(codes) < len(procs)
          break
        if failed_at is not None and now - failed_at >= grace:
          break
        time.sleep(0.05)
    finally:
      for i, p in enumerate(procs):
        if i not in codes and (code := _exit_status(p)) is not None:
          codes[i] = code
        _kill_group(p)
      results = []
      for i, (out, err) in enumerate(files):
        texts = []
        for f in (out, err):
          f.seek(0)
          texts.append(f.read().decode(errors="replace"))
          f.close()
        if i < len(procs):  # a failed Popen leaves its files without a process
          results.append(ProcessResult(i, codes.get(i), *texts))
  return LaunchResult(results, timed_out, time.monotonic() - start, address)


def produce_once(tmp_path_factory, name: str, produce) -> pathlib.Path:
  """``produce(folder)`` once per test session, also when pytest-xdist runs the tests of
  one module in several workers (each would set up its own module fixtures): the first
  worker to ask produces, under a file lock, and the others wait for and read its folder.

  Returns:
    The folder, ``<session temp>/<name>``.
  """
  import fcntl  # pylint: disable=import-outside-toplevel  (POSIX, as these jobs are)
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  folder, done = root / name, root / f"{name}.done"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not done.exists():
        if folder.exists():  # left by a producer that failed: try again
          shutil.rmtree(folder)
        folder.mkdir()
        produce(folder)
        done.touch()
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return folder


def run_worker(scenario: str, out_dir: str | os.PathLike, *, num_processes: int = 2,
               devices_per_process: int = 4, timeout: float = 60.0,
               env: Mapping[str, str] | None = None,
               xla_flags: Sequence[str] = (), grace: float = GRACE_S) -> LaunchResult:
  """Runs ``scenarios.<scenario>(out_dir)`` in each process of a loopback job.

  The worker initialises JAX's distributed runtime with
  :func:`ortho_optax.distributed.initialize_multiprocess` before anything else.
  """
  return launch([sys.executable, str(WORKER), scenario, str(out_dir)],
                num_processes=num_processes, devices_per_process=devices_per_process,
                timeout=timeout, env=env, xla_flags=xla_flags, grace=grace)
