"""Command line: ``ortho-optax train`` and ``ortho-optax compare`` (also ``python -m ortho_optax``).

Examples::

  ortho-optax train --opt muon --lr 0.02 --steps 300 --out runs/muon
  ortho-optax train --opt muon --opt-arg momentum=0.9 --out runs/muon --resume
  ortho-optax compare                        # tiny preset, embedded corpus, 7 optimizers
  ortho-optax compare --opt adamw muon --lr-mults 0.5 1 2 --steps 1000 --out runs/sweep
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ortho_optax.models import optimizers as opt_lib


def _add_common(p: argparse.ArgumentParser) -> None:
  p.add_argument("--preset", default="tiny", help="model preset: tiny, small, medium")
  p.add_argument("--data", default="embedded",
                 help="embedded[:prose|:code] | text:<glob> | shards:<train>[;<val>] | hf:<name>")
  p.add_argument("--steps", type=int, default=None, help="training steps")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--seq-len", type=int, default=None, help="default: the preset's")
  p.add_argument("--num-layers", type=int, default=None)
  p.add_argument("--model-dim", type=int, default=None)
  p.add_argument("--num-heads", type=int, default=None)
  p.add_argument("--vocab-size", type=int, default=None)
  p.add_argument("--dtype", default=None, choices=["auto", "bfloat16", "float16", "float32"],
                 help="compute dtype (auto: bf16 on GPU, f32 on CPU); weights stay f32")
  p.add_argument("--fp8-head", action="store_true", help="FP8 e4m3 output head (Hopper)")
  p.add_argument("--attention", default=None, choices=["auto", "cudnn", "xla"])
  p.add_argument("--adam-lr", type=float, default=opt_lib.TINY_ADAM_LR,
                 help="AdamW lr of embeddings/head in the hybrid optimizers")
  p.add_argument("--weight-decay", type=float, default=0.0)
  p.add_argument("--opt-arg", action="append", default=[], metavar="KEY=VALUE",
                 help="extra optimizer keyword argument (repeatable)")
  p.add_argument("--warmup", type=float, default=0.05,
                 help="warm-up steps (a value in (0,1) is a fraction of --steps)")
  p.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"])
  p.add_argument("--final-lr-frac", type=float, default=0.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--eval-every", type=int, default=None)
  p.add_argument("--eval-batches", type=int, default=8)
  p.add_argument("--log-every", type=int, default=10)
  p.add_argument("--out", default=None, help="output directory")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--mesh-data", type=int, default=None,
                 help="data-parallel size of a (data, fsdp) device mesh (default with a mesh: "
                      "the devices left after --mesh-fsdp); no mesh flag = one device")
  p.add_argument("--mesh-fsdp", type=int, default=None,
                 help="FSDP size: params and optimizer state sharded over it (--mesh-fsdp 1 "
                      "alone = every device on data)")
  p.add_argument("--ortho-sharding", default="gather_whole", choices=["gather_whole", "auto"],
                 help="how orthogonalization is laid out on the mesh (ortho_optax.distributed)")
  p.add_argument("--multihost", action="store_true",
                 help="call jax.distributed.initialize() first (one process per host)")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="ortho-optax", description="Train the ortho-optax GPT with orthogonalized optimizers.")
  sub = parser.add_subparsers(dest="command", required=True)

  t = sub.add_parser("train", help="train one configuration")
  _add_common(t)
  t.add_argument("--opt", default="adamw", choices=opt_lib.OPTIMIZERS)
  t.add_argument("--lr", type=float, default=None, help="peak lr (default: tiny default)")
  t.add_argument("--checkpoint-every", type=int, default=0)
  t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")

  c = sub.add_parser("compare", help="train several optimizers on the same data and seed")
  _add_common(c)
  c.add_argument("--opt", nargs="+", default=list(opt_lib.COMPARE_DEFAULT),
                 choices=opt_lib.OPTIMIZERS)
  c.add_argument("--lr", action="append", default=[], metavar="NAME=LR",
                 help="base lr of one optimizer (repeatable)")
  c.add_argument("--lr-mults", nargs="+", type=float, default=[1.0],
                 help="learning-rate sweep: multipliers of each base lr")
  return parser


def config_from_args(args) -> "train_lib.TrainConfig":
  from ortho_optax.models import train as train_lib  # pylint: disable=import-outside-toplevel
  model = {k: v for k, v in {
      "num_layers": args.num_layers, "model_dim": args.model_dim,
      "num_heads": args.num_heads, "vocab_size": args.vocab_size,
      "attention": args.attention, "compute_dtype": args.dtype}.items() if v is not None}
  if args.fp8_head:
    model["fp8_head"] = True
  steps = args.steps if args.steps is not None else (300 if args.command == "train" else 250)
  eval_every = args.eval_every if args.eval_every is not None else max(steps // 5, 1)
  cfg = train_lib.TrainConfig(
      preset=args.preset, model=model, data=args.data,
      adam_lr=args.adam_lr, weight_decay=args.weight_decay,
      opt_args=opt_lib.parse_opt_args(args.opt_arg), steps=steps,
      batch_size=args.batch_size, seq_len=args.seq_len, warmup_steps=args.warmup,
      schedule=args.schedule, final_lr_frac=args.final_lr_frac, seed=args.seed,
      eval_every=eval_every, eval_batches=args.eval_batches, log_every=args.log_every,
      out_dir=args.out)
  cfg = dataclasses.replace(cfg, mesh_data=args.mesh_data, mesh_fsdp=args.mesh_fsdp,
                            ortho_sharding=args.ortho_sharding)
  if args.command == "train":
    cfg = dataclasses.replace(cfg, optimizer=args.opt, lr=args.lr,
                              checkpoint_every=args.checkpoint_every, resume=args.resume)
  return cfg


def _parse_lrs(items) -> dict[str, float]:
  out = {}
  for item in items:
    name, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"--lr {item!r} must look like NAME=LR in compare.")
    if name not in opt_lib.OPTIMIZERS:
      raise ValueError(f"--lr {item!r}: unknown optimizer {name!r}; valid: "
                       f"{list(opt_lib.OPTIMIZERS)}.")
    out[name] = float(value)
  return out


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  if args.multihost:  # before anything initialises a JAX backend
    from ortho_optax.models import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
    mesh_lib.initialize_multihost()
  from ortho_optax.models import train as train_lib  # pylint: disable=import-outside-toplevel
  try:
    cfg = config_from_args(args)
    if args.command == "train":
      result = train_lib.train(cfg, progress=not args.no_progress)
      print(train_lib.markdown_table([result]))
      if cfg.out_dir:
        print(f"wrote {cfg.out_dir}/results.json, loss.png, results.md")
    else:
      out = train_lib.compare(cfg, args.opt, args.lr_mults, _parse_lrs(args.lr),
                              progress=not args.no_progress)
      print(train_lib.markdown_table(out["runs"], out["best"]))
      if cfg.out_dir:
        print(f"wrote {cfg.out_dir}/results.json, loss.png, results.md")
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f"ortho-optax: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
