"""Command line: ``ortho-optax train`` and ``ortho-optax compare`` (also ``python -m ortho_optax``).

Every value is checked before anything is trained or written; a bad one ends the command
with one line, ``ortho-optax: error: ...`` naming the flag, the value and what is
allowed, and exit status 2 (a ``train`` run that diverges exits with 1, after writing its
results, and so does a ``--multihost`` process whose job does not form within
``--init-timeout``). Results go to ``--out``, by default
``runs/<command>-<YYYYmmdd-HHMMSS>/``: ``results.json``, ``results.md`` (the table) and
``loss.png``.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import os
import pathlib
import sys
import threading
import traceback

from ortho_optax import validation
from ortho_optax.models import optimizers as opt_lib

EXAMPLES = """\
examples:
  ortho-optax compare                      # tiny GPT, embedded corpus, 7 optimizers, a few CPU minutes
  ortho-optax compare --opt adamw muon --lr-mults 0.5 1 2 --steps 1000 --out runs/sweep
  ortho-optax train --opt muon --lr 0.02 --steps 300 --out runs/muon
  ortho-optax train --opt muon --steps 300 --checkpoint-every 100 --out runs/muon2
  ortho-optax train --opt muon --steps 300 --checkpoint-every 100 --out runs/muon2 --resume
  ortho-optax train --preset small --opt turbo_muon --data 'shards:fineweb_train_*.bin' --batch-size 32

Without --out, results go to runs/<command>-<date>-<time>/ (results.json, results.md, loss.png).
"""

#: The flag of each configuration field, for messages.
FLAGS = {
    "preset": "--preset", "data": "--data", "data_sha256": "--data (its contents)",
    "steps": "--steps", "batch_size": "--batch-size", "seq_len": "--seq-len",
    "num_layers": "--num-layers", "model_dim": "--model-dim", "num_heads": "--num-heads",
    "vocab_size": "--vocab-size", "compute_dtype": "--dtype", "fp8_head": "--fp8-head",
    "attention": "--attention", "optimizer": "--opt", "lr": "--lr", "adam_lr": "--adam-lr",
    "weight_decay": "--weight-decay", "opt_args": "--opt-arg", "warmup_steps": "--warmup",
    "schedule": "--schedule", "final_lr_frac": "--final-lr-frac", "seed": "--seed",
    "eval_every": "--eval-every", "eval_batches": "--eval-batches",
    "log_every": "--log-every", "checkpoint_every": "--checkpoint-every",
    "keep_checkpoints": "--keep-checkpoints", "async_checkpoints": "--async-checkpoints",
    "out_dir": "--out", "resume": "--resume", "mesh_data": "--mesh-data",
    "mesh_fsdp": "--mesh-fsdp", "ortho_sharding": "--ortho-sharding",
    "lr_mults": "--lr-mults", "model": "the model overrides", "stop_after": "--stop-after",
}
#: ``--init-timeout``'s default, that of JAX's own initialization timeout.
INIT_TIMEOUT_S = 300


def flag(field: str) -> str:
  """How a configuration field is named in messages: its flag, else ``the preset's <field>``."""
  return FLAGS.get(field, f"the preset's {field}")


class _Parser(argparse.ArgumentParser):
  """Parse errors as one line (no usage block), exit status 2."""

  def error(self, message):
    self.exit(2, f"ortho-optax: error: {message} (see ortho-optax {self._command()}--help)\n")

  def _command(self) -> str:
    parts = self.prog.split()
    return f"{parts[1]} " if len(parts) > 1 else ""


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
  """Shows each default (except empty ones, which the help text explains) and keeps the
  epilog's line breaks."""

  def _get_help_string(self, action):
    d = action.default
    if (d is None or d is False or d is argparse.SUPPRESS or (isinstance(d, list) and not d)
        or "%(default)" in (action.help or "")):
      return action.help
    return super()._get_help_string(action)


def _name_equals_lr(text: str) -> tuple[str, float]:
  name, sep, value = text.partition("=")
  if not sep or not name:
    raise argparse.ArgumentTypeError(f"{text!r} must look like NAME=LR, e.g. muon=0.02")
  try:
    return name, float(value)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r}: the learning rate {value!r} is not a "
                                     "number") from None


def _add_common(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("model and data")
  g.add_argument("--preset", default="tiny", help="model preset: tiny, small (GPT-2 124M), medium")
  g.add_argument("--data", default="embedded",
                 help="embedded[:prose|:code] (no download) | text:<files or glob> | "
                      "shards:<train glob>[;<val glob>] (FineWeb token shards) | hf:<name>")
  g.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the preset's)")
  g.add_argument("--num-layers", type=int, default=None, help="default: the preset's")
  g.add_argument("--model-dim", type=int, default=None, help="default: the preset's")
  g.add_argument("--num-heads", type=int, default=None, help="default: the preset's")
  g.add_argument("--vocab-size", type=int, default=None, help="default: the preset's")
  g.add_argument("--dtype", default=None, choices=["auto", "bfloat16", "float16", "float32"],
                 help="compute dtype (default auto: bf16 on GPU, f32 on CPU); weights stay f32")
  g.add_argument("--fp8-head", action="store_true", help="FP8 e4m3 output head (Hopper)")
  g.add_argument("--attention", default=None, choices=["auto", "cudnn", "xla"],
                 help="attention kernel (default auto: cuDNN on GPU with 16-bit compute)")
  g = p.add_argument_group("optimization")
  g.add_argument("--adam-lr", type=float, default=opt_lib.TINY_ADAM_LR,
                 help="AdamW lr of embeddings and head in the hybrid optimizers")
  g.add_argument("--weight-decay", type=float, default=0.0,
                 help="decoupled weight decay of the orthogonalized matrices (adamw: of all)")
  g.add_argument("--opt-arg", action="append", default=[], metavar="KEY=VALUE",
                 help="extra optimizer keyword argument, e.g. momentum=0.9 (repeatable)")
  g.add_argument("--steps", type=int, default=None,
                 help="training steps (default: 300 for train, 250 for compare)")
  g.add_argument("--batch-size", type=int, default=32, help="sequences per step")
  g.add_argument("--warmup", type=float, default=0.05,
                 help="linear warm-up: a value in (0, 1) is a fraction of --steps, else steps")
  g.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"],
                 help="decay after the warm-up")
  g.add_argument("--final-lr-frac", type=float, default=0.0,
                 help="end of the decay, as a fraction of the peak lr")
  g.add_argument("--seed", type=int, default=0, help="model init and batch order")
  g = p.add_argument_group("evaluation and output")
  g.add_argument("--eval-every", type=int, default=None,
                 help="validate every N steps and at the end; 0 = only at the end "
                      "(default: steps / 5)")
  g.add_argument("--eval-batches", type=int, default=8, help="validation batches per evaluation")
  g.add_argument("--log-every", type=int, default=10,
                 help="read the train loss and update the progress bar every N steps")
  g.add_argument("--out", default=None,
                 help="output folder (default: runs/<command>-<YYYYmmdd-HHMMSS>/)")
  g.add_argument("--no-progress", action="store_true", help="no progress bars")
  g = p.add_argument_group("devices")
  g.add_argument("--mesh-data", type=int, default=None,
                 help="data-parallel size of a (data, fsdp) device mesh (default with a mesh: "
                      "the devices left after --mesh-fsdp); no mesh flag = one device")
  g.add_argument("--mesh-fsdp", type=int, default=None,
                 help="FSDP size: params and optimizer state sharded over it (--mesh-fsdp 1 "
                      "alone = every device on data)")
  g.add_argument("--ortho-sharding", default="gather_whole", choices=["gather_whole", "auto"],
                 help="how orthogonalization is laid out on the mesh (ortho_optax.distribute)")
  g = p.add_argument_group("several processes (one per host)")
  g.add_argument("--multihost", action="store_true",
                 help="join a job of several processes first (one per host): under SLURM "
                      "or Open MPI JAX finds its peers, else set JAX_COORDINATOR_ADDRESS, "
                      "JAX_NUM_PROCESSES and JAX_PROCESS_ID; CPU devices talk over gloo")
  g.add_argument("--init-timeout", type=int, default=None, metavar="S",
                 help=f"with --multihost: seconds to wait for every process to join "
                      f"(default {INIT_TIMEOUT_S})")
  g.add_argument("--heartbeat-timeout", type=int, default=None, metavar="S",
                 help="with --multihost: seconds without a heartbeat after which a process "
                      "counts as dead and the job ends (default: JAX's, 100)")


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="ortho-optax", formatter_class=_Formatter, epilog=EXAMPLES,
                   description="Train the ortho-optax GPT with orthogonalized optimizers.")
  sub = parser.add_subparsers(dest="command", required=True, metavar="{train,compare}")
  names = ", ".join(opt_lib.OPTIMIZERS)

  t = sub.add_parser("train", help="train one configuration", formatter_class=_Formatter,
                     epilog=EXAMPLES, description="Train one optimizer on the GPT.")
  t.add_argument("--opt", default="adamw", choices=opt_lib.OPTIMIZERS, metavar="NAME",
                 help=f"optimizer: {names}")
  t.add_argument("--lr", type=float, default=None,
                 help="peak learning rate (default: the optimizer's tuned tiny-preset value)")
  _add_common(t)
  g = t.add_argument_group("checkpoints")
  g.add_argument("--checkpoint-every", type=int, default=0,
                 help="write an orbax checkpoint every N steps and at the end; 0 = none")
  g.add_argument("--keep-checkpoints", type=int, default=3, help="newest checkpoints kept")
  g.add_argument("--async-checkpoints", action="store_true",
                 help="write checkpoints in the background")
  g.add_argument("--resume", action="store_true",
                 help="continue the run in --out from its newest checkpoint (same settings)")
  g.add_argument("--stop-after", type=int, default=None, metavar="N",
                 help="stop after step N as if interrupted (with --checkpoint-every, step N "
                      "is checkpointed and --resume goes on from it)")

  c = sub.add_parser("compare", help="train several optimizers on the same data and seed",
                     formatter_class=_Formatter, epilog=EXAMPLES,
                     description="Train several optimizers (and learning rates) on the same "
                                 "data and seed; one table and one plot.")
  c.add_argument("--opt", nargs="+", default=list(opt_lib.COMPARE_DEFAULT),
                 choices=opt_lib.OPTIMIZERS, metavar="NAME", help=f"optimizers: {names}")
  c.add_argument("--lr", action="append", default=[], metavar="NAME=LR", type=_name_equals_lr,
                 help="base lr of one optimizer, e.g. muon=0.02 (repeatable; default: each "
                      "optimizer's tuned tiny-preset value)")
  c.add_argument("--lr-mults", nargs="+", type=float, default=[1.0], metavar="M",
                 help="learning-rate sweep: multipliers of each base lr")
  _add_common(c)
  return parser


def config_from_args(args) -> "config_lib.TrainConfig":
  """The :class:`~ortho_optax.models.config.TrainConfig` of parsed arguments (unchecked)."""
  from ortho_optax.models import config as config_lib  # pylint: disable=import-outside-toplevel
  model = {k: v for k, v in {
      "num_layers": args.num_layers, "model_dim": args.model_dim,
      "num_heads": args.num_heads, "vocab_size": args.vocab_size,
      "attention": args.attention, "compute_dtype": args.dtype}.items() if v is not None}
  if args.fp8_head:
    model["fp8_head"] = True
  steps = args.steps if args.steps is not None else (300 if args.command == "train" else 250)
  eval_every = args.eval_every if args.eval_every is not None else max(steps // 5, 1)
  cfg = config_lib.TrainConfig(
      preset=args.preset, model=model, data=args.data,
      adam_lr=args.adam_lr, weight_decay=args.weight_decay,
      opt_args=opt_lib.parse_opt_args(args.opt_arg), steps=steps,
      batch_size=args.batch_size, seq_len=args.seq_len, warmup_steps=args.warmup,
      schedule=args.schedule, final_lr_frac=args.final_lr_frac, seed=args.seed,
      eval_every=eval_every, eval_batches=args.eval_batches, log_every=args.log_every,
      out_dir=args.out, mesh_data=args.mesh_data, mesh_fsdp=args.mesh_fsdp,
      ortho_sharding=args.ortho_sharding)
  if args.command == "train":
    cfg.optimizer, cfg.lr = args.opt, args.lr
    cfg.checkpoint_every, cfg.keep_checkpoints = args.checkpoint_every, args.keep_checkpoints
    cfg.async_checkpoints, cfg.resume = args.async_checkpoints, args.resume
    cfg.stop_after = args.stop_after
  return cfg


def default_out_dir(command: str, root: str = "runs") -> str:
  """``runs/<command>-<YYYYmmdd-HHMMSS>``, with a ``-2``, ``-3``... suffix if taken."""
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  base = pathlib.Path(root) / f"{command}-{stamp}"
  path, k = base, 1
  while path.exists():
    k += 1
    path = base.with_name(f"{base.name}-{k}")
  return str(path)


def _load_data(spec: str):
  from ortho_optax.models import data as data_lib  # pylint: disable=import-outside-toplevel
  try:
    return data_lib.load_dataset(spec)
  except (ValueError, FileNotFoundError, ImportError, OSError) as e:
    raise ValueError(f"{flag('data')} {spec}: {e}") from None


def _job_options(args) -> dict:
  """The keyword arguments of :func:`join_job` (checked), or ``{}`` without --multihost."""
  given = [f for f, v in (("--init-timeout", args.init_timeout),
                          ("--heartbeat-timeout", args.heartbeat_timeout)) if v is not None]
  if not args.multihost:
    if given:
      raise ValueError(f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} "
                       "only with --multihost.")
    return {}
  init_timeout = INIT_TIMEOUT_S if args.init_timeout is None else args.init_timeout
  validation.check_int("--init-timeout", init_timeout, 1)
  if args.heartbeat_timeout is not None:
    validation.check_int("--heartbeat-timeout", args.heartbeat_timeout, 1)
  return {"init_timeout": init_timeout, "heartbeat_timeout": args.heartbeat_timeout}


#: Seconds JAX's own initialization timeout runs past :func:`join_job`'s, so that the
#: watchdog, with its one-line message, ends a job that does not form.
_JAX_TIMEOUT_MARGIN_S = 30


def join_job(init_timeout: int = INIT_TIMEOUT_S, heartbeat_timeout: int | None = None) -> None:
  """``--multihost``: joins this process to a job of several processes.

  Through :func:`ortho_optax.distributed.initialize_multiprocess` (CPU collectives, the
  ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` variables, cluster detection by JAX); it must
  run before anything initialises a JAX backend, and does nothing in a process that has
  already joined a job. When the job has not formed after ``init_timeout`` seconds (the
  coordinator unreachable, or a process that never started), the process ends with one
  line, ``ortho-optax: error: ...``, and exit status 1: JAX itself would end it later with
  a fatal log and ``SIGABRT``, which no Python code can catch.

  Args:
    init_timeout: seconds to wait for every process to join.
    heartbeat_timeout: seconds without a heartbeat after which JAX counts a process as
      dead and ends the others (``None``: JAX's default, 100). A process that dies
      mid-training thus ends its peers within about this time, with JAX's message
      ``Terminating process because the JAX distributed service detected fatal errors``.

  Raises:
    ValueError: for bad ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` values, or when JAX
      finds no coordinator (neither a known cluster nor ``JAX_COORDINATOR_ADDRESS``).
  """
  # pylint: disable=import-outside-toplevel
  import jax
  from ortho_optax import distributed
  if jax.distributed.is_initialized():
    return
  kwargs = {}
  if heartbeat_timeout is not None:
    if "heartbeat_timeout_seconds" not in inspect.signature(jax.distributed.initialize).parameters:
      raise ValueError(f"--heartbeat-timeout needs a JAX whose jax.distributed.initialize takes "
                       f"heartbeat_timeout_seconds; JAX {jax.__version__} does not.")
    kwargs["heartbeat_timeout_seconds"] = heartbeat_timeout
  joined = threading.Event()

  def give_up():
    if joined.wait(init_timeout):
      return
    env = os.environ
    at = env.get("JAX_COORDINATOR_ADDRESS") or "the coordinator JAX detected"
    if env.get("JAX_PROCESS_ID") == "0":
      what = f"not every process of the job joined process 0 at {at}"
    else:
      who = f"process {env['JAX_PROCESS_ID']}" if env.get("JAX_PROCESS_ID") else "this process"
      what = f"{who} could not join the job at {at}"
    sys.stderr.write(
        f"ortho-optax: error: --multihost: {what} within --init-timeout {init_timeout} s; "
        "start every process with the same JAX_COORDINATOR_ADDRESS (the host of process 0 "
        "and a free port) and JAX_NUM_PROCESSES, and check that the port is reachable.\n")
    sys.stderr.flush()
    os._exit(1)  # the main thread is blocked inside JAX's connect

  threading.Thread(target=give_up, name="join-job-watchdog", daemon=True).start()
  try:
    distributed.initialize_multiprocess(
        initialization_timeout=init_timeout + _JAX_TIMEOUT_MARGIN_S, **kwargs)
  except ValueError as e:
    if "coordinator_address" in str(e):
      raise ValueError(f"--multihost: {e} No cluster (SLURM, Open MPI, Kubernetes, Cloud "
                       "TPU) was detected: set JAX_COORDINATOR_ADDRESS=<host of process "
                       "0>:<port>, JAX_NUM_PROCESSES and JAX_PROCESS_ID on every "
                       "process.") from None
    raise ValueError(f"--multihost: {e}") from None
  finally:
    joined.set()


#: The exit status after Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130


def _interrupted(cfg) -> int:
  """Ctrl-C: one line saying what is kept, and the shell's exit status for SIGINT."""
  from ortho_optax.models import checkpoints as ckpt_lib  # pylint: disable=import-outside-toplevel
  steps = ckpt_lib.complete_steps(cfg.out_dir) if cfg.out_dir else []
  kept = (f"its newest checkpoint is step {steps[-1]} in {ckpt_lib.directory(cfg.out_dir)}; "
          "run the same command with --resume to continue" if steps else
          "no checkpoint was saved (--checkpoint-every N saves them)")
  print(f"\northo-optax: interrupted; {kept}.", file=sys.stderr)
  return EXIT_INTERRUPTED


def _end_job(error: BaseException) -> None:
  """Ends this process of a job of several processes that failed mid-run, at once.

  The traceback, then one line, then ``os._exit(1)``: a normal exit would first wait in
  JAX's shutdown barrier for the other processes (a dead one never comes; JAX aborts
  after its heartbeat timeout with a fatal log). The failure of a cross-process
  collective is how a process learns that another one died.
  """
  import jax  # pylint: disable=import-outside-toplevel
  traceback.print_exc()
  text = str(error).strip().splitlines()
  sys.stderr.write(
      f"ortho-optax: error: process {jax.process_index()} of {jax.process_count()} stopped "
      f"mid-run ({type(error).__name__}: {text[0][:300] if text else ''}); when a "
      "collective failed, another process of the job has most likely died (see its log). "
      "The job ends; --resume continues from its newest complete checkpoint.\n")
  sys.stderr.flush()
  sys.stdout.flush()
  os._exit(1)


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    job = _job_options(args)
    if job:  # before anything initialises a JAX backend
      join_job(**job)
  except ValueError as e:
    print(f"ortho-optax: error: {e}", file=sys.stderr)
    return 2
  from ortho_optax.models import reports  # pylint: disable=import-outside-toplevel
  from ortho_optax.models import train as train_lib  # pylint: disable=import-outside-toplevel

  # Every check first: a bad value ends here, before anything is trained or written.
  try:
    cfg = config_from_args(args)
    if cfg.out_dir is None and not cfg.resume:
      cfg.out_dir = default_out_dir(args.command)
    if args.command == "train":
      cfgs = [cfg]
    else:
      train_lib.check_no_repeats(flag("lr"), [n for n, _ in args.lr],
                                 "one learning rate per optimizer")
      cfgs = train_lib.sweep_configs(cfg, args.opt, args.lr_mults, dict(args.lr), flag)
      cfg.validate(flag)
      train_lib.check_out_dir(cfg, flag)
    dataset = _load_data(cfg.data)
    for c in cfgs:
      train_lib.check_run(c, dataset, flag)
  except ValueError as e:
    print(f"ortho-optax: error: {e}", file=sys.stderr)
    return 2

  print(reports.header(args.command, cfgs, dataset, cfg.out_dir), flush=True)
  import jax  # pylint: disable=import-outside-toplevel
  progress = not args.no_progress and jax.process_index() == 0  # one bar for the job
  try:
    if args.command == "train":
      runs, best = [train_lib.train(cfg, dataset, progress=progress, name=flag)], None
    else:
      out = train_lib.compare(cfg, args.opt, args.lr_mults, dict(args.lr), progress=progress,
                              dataset=dataset, name=flag)
      runs, best = out["runs"], out["best"]
  except KeyboardInterrupt:
    return _interrupted(cfg)
  except ValueError as e:  # found during the run (a damaged checkpoint): one line
    if jax.process_count() > 1:
      _end_job(e)
    print(f"ortho-optax: error: {e}", file=sys.stderr)
    return 1
  except Exception as e:  # pylint: disable=broad-except
    if jax.process_count() == 1:
      raise
    _end_job(e)
  print(reports.markdown_table(runs, best))
  print(f"results: {cfg.out_dir}/ (results.json, results.md, loss.png)")
  if args.command == "train" and runs[0]["diverged_at"] is not None:
    print(f"ortho-optax: the run diverged (non-finite loss at step {runs[0]['diverged_at']})",
          file=sys.stderr)
    return 1
  return 0


def run() -> None:
  """The ``ortho-optax`` command: :func:`main`, then the process's exit.

  After Ctrl-C the process ends with ``os._exit``: threads of the interrupted JAX and orbax
  work may still be running, and a normal interpreter shutdown would abort on them.
  """
  code = main()
  if code == EXIT_INTERRUPTED:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


if __name__ == "__main__":
  run()
