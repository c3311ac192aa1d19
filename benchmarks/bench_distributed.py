"""Bytes moved between devices (and time, on GPUs) per optimizer step, per strategy.

For a GPT-2-small parameter tree (the ``small`` preset of ``ortho_optax.models.gpt``:
12 layers, d=768, 50304-token embedding and head) on a ``(data, fsdp)`` mesh, the
optimizer update ``(grads, state, params) -> (params, state)`` is jitted with the
parameters, gradients and optimizer state FSDP-sharded (``ortho_optax.distributed``'s
rule) and compiled once per orthogonalization strategy:

* ``gather_whole``: :func:`ortho_optax.distributed.distribute` (whole matrices per
  device inside ``shard_map``);
* ``gather_whole_bf16``: the same with ``communication_dtype=jnp.bfloat16``;
* ``auto``: the same optimizer left to XLA's automatic partitioning.

The collectives are read from the compiled HLO (``jitted.lower(...).compile().as_text()``):
every ``all-gather``, ``all-to-all``, ``reduce-scatter``, ``all-reduce`` and
``collective-permute`` (and their async ``-start`` forms) counts
``max(operand bytes, result bytes)`` of the per-device program, multiplied by the trip
count of the ``while`` loops it sits in (the Newton–Schulz iterations are a loop), and
the larger branch of a ``conditional``. "MB/device" is that sum; the total over the mesh
is ``N x`` it. It runs anywhere: on the CPU with fake devices (``--devices N``), on
several GPUs it also times the step (``--time``).

Usage::

  python benchmarks/bench_distributed.py --devices 8 --out /tmp/dist.json
  python benchmarks/bench_distributed.py --meshes 2x1,1x2 --time --out gpu.json  # 2 GPUs
"""

from __future__ import annotations

import argparse
import os
import re
import sys


def _parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--devices", type=int, default=8,
                 help="fake CPU devices (ignored when accelerators are present)")
  p.add_argument("--meshes", default=None,
                 help="comma-separated DATAxFSDP shapes (default: N x 1, N/2 x 2, 2 x N/2, 1 x N)")
  p.add_argument("--optimizers", default="muon,normuon,aurora,oadamw,adamw",
                 help="comma-separated optimizer names of the trainer registry")
  p.add_argument("--strategies", default="gather_whole,gather_whole_bf16,auto",
                 help="gather_whole | gather_whole_bf16 (communication_dtype=bf16) | auto")
  p.add_argument("--preset", default="small", help="GPT preset of the parameter tree")
  p.add_argument("--num-layers", type=int, default=None, help="override the preset's layers")
  p.add_argument("--time", action="store_true", help="also time the update (real arrays)")
  p.add_argument("--iters", type=int, default=10, help="timed iterations")
  p.add_argument("--out", default=None, help="write the results as JSON here")
  p.add_argument("--markdown", default=None, help="write a Markdown table here")
  p.add_argument("--from-json", default=None,
                 help="only render --markdown from an earlier --out JSON (no compiling)")
  return p.parse_args(argv)


ARGS = _parse_args() if __name__ == "__main__" else None
if ARGS is not None and "--xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={ARGS.devices}")

import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
import datetime  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from ortho_optax import distributed  # noqa: E402
from ortho_optax.models import mesh as mesh_lib  # noqa: E402

COLLECTIVES = ("all-gather", "all-to-all", "reduce-scatter", "all-reduce",
               "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_COMP_HEAD = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?\s*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")


def _type_bytes(text: str) -> int:
  total = 0
  for dtype, dims in _SHAPE.findall(text):
    if dtype not in _DTYPE_BYTES:
      continue
    n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    total += n * _DTYPE_BYTES[dtype]
  return total


def _operands(rest: str) -> list[str]:
  """Operand names of an instruction (the text inside its first parentheses)."""
  depth, out, cur = 1, [], ""
  for ch in rest:
    if ch == "(":
      depth += 1
    elif ch == ")":
      depth -= 1
      if depth == 0:
        break
    cur += ch
  for part in cur.split(","):
    m = re.search(r"%([\w.\-]+)", part)
    if m:
      out.append(m.group(1))
  return out


def collective_bytes(hlo_text: str) -> dict:
  """Per-device bytes of the collectives of a compiled HLO module, by kind.

  Loops multiply their body by ``known_trip_count`` (1 with a warning flag when
  unknown); conditionals count their largest branch.
  """
  comps: dict[str, list] = {}
  entry = None
  current = None
  types: dict[str, str] = {}
  for line in hlo_text.splitlines():
    head = _COMP_HEAD.match(line.strip())
    if head and "=" not in line.split("->")[0]:
      current = head.group(2)
      comps[current] = []
      if head.group(1):
        entry = current
      continue
    m = _INSTR.match(line)
    if not m or current is None:
      continue
    name, rtype, op, rest = m.group(2), m.group(3), m.group(4), m.group(5)
    types[name] = rtype
    comps[current].append((name, rtype, op, rest))
  unknown_trip = []
  memo: dict[str, dict] = {}  # per module: computation names repeat across modules

  def visit(comp: str) -> dict:
    if comp in memo:
      return memo[comp]
    acc = {k: 0 for k in COLLECTIVES} | {"count": 0}
    for name, rtype, op, rest in comps.get(comp, []):
      base = op[:-6] if op.endswith("-start") else op
      if base in COLLECTIVES:
        operand_bytes = sum(_type_bytes(types.get(o, "")) for o in _operands(rest))
        result_bytes = _type_bytes(rtype)
        if op.endswith("-start") and result_bytes > operand_bytes > 0:
          result_bytes -= operand_bytes  # async tuples repeat the operands
        acc[base] += max(operand_bytes, result_bytes)
        acc["count"] += 1
      if op == "while":
        body = re.search(r"body=%?([\w.\-]+)", rest)
        trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
        n = int(trip.group(1)) if trip else 1
        if not trip:
          unknown_trip.append(name)
        if body:
          sub = visit(body.group(1))
          for k in acc:
            acc[k] += n * sub[k]
      elif op == "conditional":
        branches = re.search(r"branch_computations=\{([^}]*)\}", rest)
        names = re.findall(r"%?([\w.\-]+)", branches.group(1)) if branches else re.findall(
            r"(?:true|false)_computation=%?([\w.\-]+)", rest)
        subs = [visit(b) for b in names]
        if subs:
          best = max(subs, key=lambda s: sum(s[k] for k in COLLECTIVES))
          for k in acc:
            acc[k] += best[k]
      else:
        for callee in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", rest):
          sub = visit(callee)
          for k in acc:
            acc[k] += sub[k]
    memo[comp] = acc
    return acc

  result = visit(entry) if entry else {k: 0 for k in COLLECTIVES} | {"count": 0}
  result = dict(result)
  result["total"] = sum(result[k] for k in COLLECTIVES)
  result["unknown_trip_loops"] = len(unknown_trip)
  return result


def _flops(compiled) -> float:
  """Per-device FLOPs of the compiled program (XLA's cost analysis; loops counted once
  by some backends, so compare strategies with each other, not with theory)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return float("nan")
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def gpt_param_shapes(preset: str, num_layers: int | None = None):
  """Abstract parameters (ShapeDtypeStructs, pure dict) of a GPT preset."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from ortho_optax.models import gpt  # pylint: disable=import-outside-toplevel
  overrides = {} if num_layers is None else {"num_layers": num_layers}
  cfg = gpt.get_config(preset, **overrides)
  abstract = nnx.eval_shape(lambda: gpt.GPT(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(abstract, nnx.Param)
  pure = state.to_pure_dict() if hasattr(state, "to_pure_dict") else nnx.to_pure_dict(state)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), pure)


def build_optimizer(name: str):
  from ortho_optax.models import optimizers as opt_lib  # pylint: disable=import-outside-toplevel
  return opt_lib.build(name, opt_lib.default_lr(name), adam_learning_rate=3e-4)


def compile_update(tx, params, mesh, strategy):
  """Jitted ``(grads, state, params) -> (params, state)`` with FSDP shardings."""
  if strategy == "gather_whole_bf16":
    tx = distributed.distribute(tx, mesh, strategy="gather_whole",
                                communication_dtype=jnp.bfloat16)
  elif strategy != "none":
    tx = distributed.distribute(tx, mesh, strategy=strategy)
  state = jax.eval_shape(tx.init, params)
  p_sh = mesh_lib.state_shardings(params, mesh)
  s_sh = mesh_lib.state_shardings(state, mesh)

  def step(grads, opt_state, p):
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state

  jitted = jax.jit(step, in_shardings=(p_sh, s_sh, p_sh), out_shardings=(p_sh, s_sh),
                   donate_argnums=(1, 2))
  return jitted, state, p_sh, s_sh


def time_update(jitted, params, state, p_sh, s_sh, iters):
  key = jax.random.key(0)
  make = lambda s, sh: jax.device_put(
      jax.random.normal(key, s.shape, s.dtype) * 0.02, sh)
  p = jax.tree.map(make, params, p_sh)
  g = jax.tree.map(make, params, p_sh)
  opt_state = jax.tree.map(
      lambda s, sh: jax.device_put(jnp.zeros(s.shape, s.dtype), sh), state, s_sh)
  p, opt_state = jitted(g, opt_state, p)  # compile + warm up
  jax.block_until_ready(p)
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    p, opt_state = jitted(g, opt_state, p)
    jax.block_until_ready(p)
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def markdown(payload: dict) -> str:
  """The result table in Markdown, with the command, machine and date."""
  m = payload["machine"]
  lines = [
      f"# Collective bytes per optimizer step ({payload['preset']} GPT, "
      f"{payload['num_params'] / 1e6:.1f}M params, f32)", "",
      f"Command: `{payload['command']}`  ",
      f"Machine: {m['num_devices']} x {m['device']} ({m['backend']}), {m['platform']}, "
      f"{m['cpu_count']} CPU cores, jax {m['jax']}  ",
      f"Date: {payload['date']}", "",
      f"Definition: {payload['definition']}. MB = 2^20 bytes, per device per optimizer "
      "step (parameters, gradients and optimizer state FSDP-sharded over `fsdp`, "
      "replicated over `data`). GFLOP/device: XLA's cost analysis of the same program "
      "(relative only).", "",
      "| optimizer | mesh data x fsdp | strategy | MB/device | all-gather | all-to-all | "
      "all-reduce | reduce-scatter | #collectives | GFLOP/device | ms/step |",
      "|---|---|---|---|---|---|---|---|---|---|---|"]
  mb = lambda v: f"{v / 2**20:.1f}"
  for r in payload["rows"]:
    mesh = f"{r['mesh']['data']} x {r['mesh']['fsdp']}"
    if "error" in r:
      lines.append(f"| {r['optimizer']} | {mesh} | {r['strategy']} | failed: "
                   f"{r['error'][:80]} | | | | | | | |")
      continue
    k = r["bytes_by_kind"]
    ms = r.get("ms_per_step")
    lines.append(
        f"| {r['optimizer']} | {mesh} | {r['strategy']} | {mb(r['bytes_per_device'])} | "
        f"{mb(k['all-gather'])} | {mb(k['all-to-all'])} | {mb(k['all-reduce'])} | "
        f"{mb(k['reduce-scatter'])} | {r['num_collectives']} | "
        f"{r.get('gflop_per_device', float('nan')):.1f} | "
        f"{'-' if ms is None else f'{ms:.2f}'} |")
  return "\n".join(lines) + "\n"


def main(args) -> int:
  if args.from_json:
    with open(args.from_json) as f:
      payload = json.load(f)
    text = markdown(payload)
    if args.markdown:
      with open(args.markdown, "w") as f:
        f.write(text)
    print(text)
    return 0
  n = jax.device_count()
  if args.meshes:
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.meshes.split(",")]
  else:
    shapes = [(n, 1), (max(n // 2, 1), min(2, n)), (min(2, n), max(n // 2, 1)), (1, n)]
    shapes = list(dict.fromkeys(s for s in shapes if s[0] * s[1] == n))
  params = gpt_param_shapes(args.preset, args.num_layers)
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  rows = []
  payload = {
      "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "machine": {"platform": platform.platform(), "device": jax.devices()[0].device_kind,
                  "backend": jax.default_backend(), "num_devices": n,
                  "cpu_count": os.cpu_count(), "jax": jax.__version__},
      "preset": args.preset, "num_params": n_params,
      "definition": "per-device bytes: max(operand, result) of each collective in the "
                    "compiled HLO, x while-loop trip counts; largest conditional branch",
      "rows": rows,
  }

  def dump():  # after every row: a long run interrupted keeps what it measured
    if args.out:
      with open(args.out, "w") as f:
        json.dump(payload, f, indent=1)

  print(f"{args.preset} GPT ({n_params / 1e6:.1f}M params, f32), {n} x "
        f"{jax.devices()[0].platform} devices", flush=True)
  header = (f"{'optimizer':>10} {'mesh':>6} {'strategy':>17} {'MB/device':>10} "
            f"{'all-gather':>10} {'all-to-all':>10} {'red-scat':>9} {'all-red':>9} "
            f"{'c-perm':>8} {'#ops':>5} {'GFLOP/dev':>9} {'ms/step':>8}")
  print(header)
  for opt_name in args.optimizers.split(","):
    strategies = ["none"] if opt_name == "adamw" else args.strategies.split(",")
    for shape in shapes:
      mesh = mesh_lib.make_mesh(*shape)
      for strategy in strategies:
        tx = build_optimizer(opt_name)
        try:
          jitted, state, p_sh, s_sh = compile_update(tx, params, mesh, strategy)
          t0 = time.perf_counter()
          compiled = jitted.lower(params, state, params).compile()
          compile_s = time.perf_counter() - t0
          b = collective_bytes(compiled.as_text())
          gflops = _flops(compiled) / 1e9
          ms = None
          if args.time:
            ms = 1e3 * time_update(jitted, params, state, p_sh, s_sh, args.iters)
        except Exception as e:  # pylint: disable=broad-except
          # Keep going (one failing configuration must not lose the others' numbers).
          print(f"{opt_name} {shape} {strategy}: FAILED {type(e).__name__}: {e}"[:2000],
                flush=True)
          rows.append({"optimizer": opt_name, "mesh": {"data": shape[0], "fsdp": shape[1]},
                       "strategy": strategy, "error": f"{type(e).__name__}: {e}"[:2000]})
          dump()
          continue
        row = {"optimizer": opt_name, "mesh": {"data": shape[0], "fsdp": shape[1]},
               "strategy": strategy, "bytes_per_device": b["total"],
               "bytes_by_kind": {k: b[k] for k in COLLECTIVES}, "num_collectives": b["count"],
               "unknown_trip_loops": b["unknown_trip_loops"], "compile_s": compile_s,
               "gflop_per_device": gflops,
               "ms_per_step": ms}
        rows.append(row)
        dump()
        mb = lambda v: f"{v / 2**20:.1f}"
        print(f"{opt_name:>10} {shape[0]}x{shape[1]:<4} {strategy:>17} "
              f"{mb(b['total']):>10} {mb(b['all-gather']):>10} {mb(b['all-to-all']):>10} "
              f"{mb(b['reduce-scatter']):>9} {mb(b['all-reduce']):>9} "
              f"{mb(b['collective-permute']):>8} {b['count']:>5} {gflops:>9.1f} "
              f"{(f'{ms:.2f}' if ms is not None else '-'):>8}", flush=True)
  dump()
  if args.out:
    print(f"wrote {args.out}")
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write(markdown(payload))
    print(f"wrote {args.markdown}")
  return 0


if __name__ == "__main__":
  sys.exit(main(ARGS))
