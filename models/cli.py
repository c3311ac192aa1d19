"""Command line: ``ortho-optax train`` and ``ortho-optax compare`` (also ``python -m ortho_optax``).

Every value is checked before anything is trained or written; a bad one ends the command
with one line, ``ortho-optax: error: ...`` naming the flag, the value and what is
allowed, and exit status 2 (a ``train`` run that diverges exits with 1, after writing its
results). Results go to ``--out``, by default
``runs/<command>-<YYYYmmdd-HHMMSS>/``: ``results.json``, ``results.md`` (the table) and
``loss.png``.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys

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
    "lr_mults": "--lr-mults", "model": "the model overrides",
}


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
  g.add_argument("--multihost", action="store_true",
                 help="call jax.distributed.initialize() first (one process per host)")


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


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  if args.multihost:  # before anything initialises a JAX backend
    from ortho_optax.models import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
    mesh_lib.initialize_multihost()
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
  progress = not args.no_progress
  if args.command == "train":
    runs, best = [train_lib.train(cfg, dataset, progress=progress, name=flag)], None
  else:
    out = train_lib.compare(cfg, args.opt, args.lr_mults, dict(args.lr), progress=progress,
                            dataset=dataset, name=flag)
    runs, best = out["runs"], out["best"]
  print(reports.markdown_table(runs, best))
  print(f"results: {cfg.out_dir}/ (results.json, results.md, loss.png)")
  if args.command == "train" and runs[0]["diverged_at"] is not None:
    print(f"ortho-optax: the run diverged (non-finite loss at step {runs[0]['diverged_at']})",
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
