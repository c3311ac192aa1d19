"""Where a training step's first call goes: tracing and lowering, XLA compilation, first run.

Times ``jax.jit(step).lower(...)`` and ``.compile()`` apart for the trainer's step
(``ortho_optax.models``, GPT-2 small with byte ids) and the plain user loop of
``bench_user_loop.py`` (``user_gpt``), and counts the compiled step's custom calls
(cuBLAS, cuDNN, Mosaic GPU kernels). Each case is compiled fresh, without the persistent
cache, so the numbers are what a first run pays::

  python benchmarks/first_step.py --out $OUT                      # the default cases
  python benchmarks/first_step.py --cases trainer:muon --xla-stacks   # stacks by XLA's concatenate

``--xla-stacks`` builds every kernel stack with XLA's concatenate (no TMA copy kernel), to
measure what the copy kernel costs to compile; ``--chunk-pieces N`` sets how many pieces
one copy launch takes. Writes ``<out>/first_step.json`` (one row
per case, rewritten after each) and prints one JSON line per case.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import ortho_optax  # noqa: E402
import user_gpt  # noqa: E402
from ortho_optax.models import config as config_lib  # noqa: E402
from ortho_optax.models import step as step_lib  # noqa: E402
from ortho_optax.models import train as train_lib  # noqa: E402

DEFAULT_CASES = ("trainer:adamw", "trainer:muon", "trainer:muon/xla", "user:muon", "user:muon/xla")


def custom_calls(compiled) -> dict:
  """How many custom calls of each target the compiled step makes."""
  return dict(collections.Counter(
      re.findall(r'custom_call_target="([^"]+)"', compiled.as_text())))


def timed(lower, run) -> dict:
  """Seconds of ``lower()``, of compiling its result and of two runs of it."""
  t0 = time.perf_counter()
  lowered = lower()
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  jax.block_until_ready(run(compiled))
  t3 = time.perf_counter()
  jax.block_until_ready(run(compiled))
  t4 = time.perf_counter()
  return {"lower_s": t1 - t0, "compile_s": t2 - t1, "first_run_s": t3 - t2,
          "second_run_s": t4 - t3, "custom_calls": custom_calls(compiled)}


def trainer_case(opt: str, opt_args: dict, preset: str, batch: tuple[int, int]) -> dict:
  cfg = config_lib.TrainConfig(preset=preset, optimizer=opt, opt_args=opt_args,
                               batch_size=batch[0], lr=1e-3 if opt == "adamw" else 0.02)
  model, optimizer = train_lib.init_model_and_optimizer(cfg)
  x = jnp.asarray(np.random.default_rng(0).integers(0, 256, batch), jnp.int32)
  graphdef, state = nnx.split((model, optimizer))
  leaves, treedef = jax.tree.flatten(state)

  def step(leaves, inputs, targets):
    new, loss = step_lib.train_step(graphdef, jax.tree.unflatten(treedef, leaves), inputs,
                                    targets)
    return jax.tree.leaves(new), loss

  jitted = jax.jit(step)
  return timed(lambda: jitted.lower(leaves, x, x), lambda c: c(leaves, x, x)[1])


def user_case(tx, preset: str, batch: tuple[int, int]) -> dict:
  cfg = user_gpt.get_config(preset)
  model = user_gpt.GPT(cfg, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, batch), jnp.int32)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(user_gpt.loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss

  return timed(lambda: train_step.lower(model, optimizer, x, x),
               lambda c: train_step(model, optimizer, x, x))


def run_case(case: str, preset: str, batch: tuple[int, int]) -> dict:
  where, _, name = case.partition(":")
  opt, _, variant = name.partition("/")
  args = {"backend": "xla"} if variant == "xla" else {}
  if where == "trainer":
    return trainer_case(opt, args, preset, batch)
  if where == "user":
    if opt == "adamw":
      import optax  # pylint: disable=import-outside-toplevel
      return user_case(optax.adamw(3e-4), preset, batch)
    return user_case(ortho_optax.OPTIMIZERS[opt](**args), preset, batch)
  raise ValueError(f"case {case!r}: expected trainer:NAME[/xla] or user:NAME[/xla].")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES),
                 help="trainer:NAME or user:NAME, NAME an optimizer, /xla for backend='xla'")
  p.add_argument("--preset", default="small", help="small (GPT-2 small) or tiny (CPU check)")
  p.add_argument("--xla-stacks", action="store_true",
                 help="build every kernel stack with XLA's concatenate (no TMA copy kernel)")
  p.add_argument("--chunk-pieces", type=int, default=None,
                 help="pieces per TMA copy launch (default: "
                      "ortho_optax.pallas.stack.CHUNK_PIECES)")
  p.add_argument("--out", default=".", help="folder of first_step.json")
  args = p.parse_args(argv)
  batch = (32, 1024) if args.preset == "small" else (2, 16)
  from ortho_optax.pallas import stack  # pylint: disable=import-outside-toplevel
  if args.xla_stacks:
    stack.prefers = lambda *a, **k: False
  if args.chunk_pieces is not None:
    if args.chunk_pieces < 1:
      p.error(f"--chunk-pieces must be >= 1, got {args.chunk_pieces}")
    stack.CHUNK_PIECES = args.chunk_pieces
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  rows = []
  for case in args.cases:
    try:
      row = {"case": case, "xla_stacks": args.xla_stacks, "chunk_pieces": stack.CHUNK_PIECES,
             **run_case(case, args.preset, batch)}
    except Exception as e:  # pylint: disable=broad-except
      row = {"case": case, "error": f"{type(e).__name__}: {str(e)[:400]}"}
    rows.append(row)
    print(json.dumps(row), flush=True)
    (out / "first_step.json").write_text(json.dumps(
        {"machine": {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__},
         "rows": rows}, indent=1))
  return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
