"""Reading the collectives of a compiled HLO module: which devices each one joins.

``replica_groups`` name *logical* device ids: positions in the program's device
assignment, which for a ``jit`` over a ``NamedSharding`` is ``mesh.devices.flat``.
Formats understood (XLA prints whichever its version uses):
``mesh['data'=4,'fsdp'=2] {'fsdp'}`` (groups along the named axes),
``{{0,1},{2,3}}`` (explicit), ``[4,2]<=[8]`` / ``[4,2]<=[2,4]T(1,0)`` (iota), and
``source_target_pairs={{0,1},...}`` for ``collective-permute``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import pathlib
import re

import numpy as np

COLLECTIVES = ("all-gather", "all-to-all", "reduce-scatter", "all-reduce",
               "collective-permute")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<type>.*?)\s+"
                    r"(?P<op>" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
# A mesh of named axes, optionally with the device ids of its positions (an iota, possibly
# transposed, or a list), then the axes each group spans.
_MESH = re.compile(r"replica_groups=mesh\[(?P<axes>[^\]]*)\]"
                   r"(?:,\s*device_ids=\((?:\[(?P<dims>[\d,]+)\](?:T\((?P<perm>[\d,]+)\))?"
                   r"|(?P<list>[\d,\s]+))\))?\s*\{(?P<over>[^}]*)\}")
_EXPLICIT = re.compile(r"(?:replica_groups|source_target_pairs)="
                       r"\{(?P<body>(?:\{[\d,\s]*\},?\s*)*)\}")
_IOTA = re.compile(r"replica_groups=\[(?P<shape>[\d,]+)\]<=\[(?P<dims>[\d,]+)\]"
                   r"(?:T\((?P<perm>[\d,]+)\))?")


@dataclasses.dataclass
class Collective:
  op: str
  groups: list[list[int]]  # logical device ids of each group
  line: str


def _names(text: str) -> list[str]:
  return re.findall(r"'([^']*)'", text)


def replica_groups(line: str, num_devices: int) -> list[list[int]]:
  """The device groups of one collective instruction (logical ids)."""
  m = _MESH.search(line)
  if m:
    axes = [(name, int(size)) for name, size in
            re.findall(r"'([^']*)'\s*=\s*(\d+)", m.group("axes"))]
    names = [a for a, _ in axes]
    over = _names(m.group("over"))
    size = math.prod(s for _, s in axes)
    if m.group("dims"):
      dims = [int(x) for x in m.group("dims").split(",")]
      ids = np.arange(math.prod(dims)).reshape(dims)
      if m.group("perm"):
        ids = ids.transpose([int(x) for x in m.group("perm").split(",")])
    elif m.group("list"):
      ids = np.asarray([int(x) for x in m.group("list").split(",") if x.strip()])
    else:
      ids = np.arange(size)
    ids = ids.reshape([s for _, s in axes])
    # Move the grouped axes last: each row of the result is one group.
    rest = [i for i, a in enumerate(names) if a not in over]
    grouped = [names.index(a) for a in over]
    ids = ids.transpose(rest + grouped).reshape(-1, math.prod(axes[i][1] for i in grouped))
    return ids.tolist()
  m = _IOTA.search(line)
  if m:
    shape = [int(x) for x in m.group("shape").split(",")]
    dims = [int(x) for x in m.group("dims").split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group("perm"):
      ids = ids.transpose([int(x) for x in m.group("perm").split(",")])
    return ids.reshape(shape).tolist()
  m = _EXPLICIT.search(line)
  if m:
    groups = [[int(x) for x in g.split(",") if x.strip()]
              for g in re.findall(r"\{([\d,\s]*)\}", m.group("body"))]
    return groups or [list(range(num_devices))]  # {} means every device
  raise ValueError(f"cannot read the device groups of: {line.strip()[:300]}")


def collectives(hlo_text: str, num_devices: int) -> list[Collective]:
  """Every collective instruction of ``hlo_text`` (async ``-start`` forms included)."""
  out = []
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if m:
      out.append(Collective(m.group("op"), replica_groups(line, num_devices), line.strip()))
  return out


def load_bench_distributed():
  """``benchmarks/bench_distributed.py`` as a module (its HLO byte counter)."""
  path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "bench_distributed.py"
  spec = importlib.util.spec_from_file_location("bench_distributed", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
