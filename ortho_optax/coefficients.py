"""Newton–Schulz coefficient tables and the rule that turns them into a per-step schedule.

Every table here is copied digit for digit from the seed sources (the papers and repositories
below, and NVIDIA-NeMo/Emerging-Optimizers).
A schedule is a tuple of ``steps`` quintic triples ``(a, b, c)``; each NS step maps the
singular values of the normalised input through ``σ ↦ aσ + bσ³ + cσ⁵`` (``c = 0``: cubic).

References:
  Jordan et al., *Muon: An optimizer for hidden layers in neural networks*, 2024.
  Amsel et al., *The Polar Express: Optimal Matrix Sign Methods and Their Application to
  the Muon Algorithm*, arXiv 2505.16932, 2025.
  Grishina et al., *Accelerating Newton-Schulz Iteration for Orthogonalization via Chebyshev-type
  Polynomials* (CANS), 2025.
  Boissin et al., *Turbo-Muon: Accelerating Orthogonality-Based Optimization with
  Pre-Conditioning*, arXiv 2512.04632, 2025.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence, Tuple, Union

import ml_dtypes
import numpy as np

from ortho_optax.validation import check_choice, check_int

Triple = Tuple[float, float, float]

#: Keller Jordan's "simple" quintic (Muon; NVIDIA's ``simple``).
_MUON: tuple[Triple, ...] = ((3.4445, -4.7750, 2.0315),)

#: Dion / "Muon+" / NVIDIA ``quintic`` (modded-nanogpt ``train_gpt_medium.py``).
_QUINTIC: tuple[Triple, ...] = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)

#: Polar Express (l = 1e-3), already divided by the 1.01 safety factor except the last
#: triple, as in NVIDIA Emerging-Optimizers. See :mod:`ortho_optax.polar_express`.
_POLAR_EXPRESS: tuple[Triple, ...] = (
    (8.2051, -22.9019, 16.4607),
    (4.0664, -2.8612, 0.5184),
    (3.9096, -2.8234, 0.5250),
    (3.2856, -2.4153, 0.4853),
    (2.2779, -1.6198, 0.3985),
    (1.8726, -1.2307, 0.3585),
    (1.8564, -1.2132, 0.3568),
    (1.8750, -1.2500, 0.3750),
)

#: CANS (Chebyshev-accelerated NS) as tabulated by NVIDIA Emerging-Optimizers. Its first
#: triple leaves no margin above σ = 1, so it diverges in bfloat16 (see :func:`rounding_growth`).
_CANS: tuple[Triple, ...] = (
    (8.4703, -25.1081, 18.6293),
    (4.1828, -3.1087, 0.5806),
    (3.9619, -2.9541, 0.5630),
    (3.2866, -2.4647, 0.5074),
    (2.2737, -1.6447, 0.4162),
)

#: The genetic-algorithm set of flash-newton-schulz's first commit, tuned for an
#: AOL-preconditioned start. NVIDIA uses it after plain Frobenius normalisation: choosing
#: this table does NOT turn on AOL preconditioning (that is ``preconditioning="aol"``).
_AOL: tuple[Triple, ...] = (
    (4.0098, -7.0585, 2.4635),
    (3.4585, -5.5479, 2.5959),
    (2.7573, -3.2939, 1.4254),
    (2.7215, -3.0494, 1.3169),
)

#: DeepSeek-V4: eight Keller steps then two Aurora-style polishing steps.
_DEEPSEEKV4: tuple[Triple, ...] = _MUON * 8 + ((2.0, -1.5, 0.5),) * 2

#: NVIDIA's 5-step cubic schedule (c = 0); only defined for exactly 5 steps.
_CUBIC5: tuple[Triple, ...] = (
    (3.3656576, -3.3420992, 0.0),
    (2.5744352, -1.4957376, 0.0),
    (2.5368962, -1.4312570, 0.0),
    (2.4418906, -1.2764040, 0.0),
    (2.2230472, -0.9630650, 0.0),
)

#: Aurora's simple quintic p(σ) = 2σ − 1.5σ³ + 0.5σ⁵ (fixed points 0, 1, √2; p'(1) = 0).
_AURORA: tuple[Triple, ...] = ((2.0, -1.5, 0.5),)

#: Named coefficient tables. ``turbo_aol`` is the Dion ``quintic`` table read from its end
#: (see :func:`resolve_coefficients`).
PRESETS: dict[str, tuple[Triple, ...]] = {
    "muon": _MUON,
    "quintic": _QUINTIC,
    "polar_express": _POLAR_EXPRESS,
    "cans": _CANS,
    "aol": _AOL,
    "turbo_aol": _QUINTIC,
    "deepseekv4": _DEEPSEEKV4,
    "cubic5": _CUBIC5,
    "aurora": _AURORA,
}

#: Aliases accepted for NVIDIA's names.
ALIASES: dict[str, str] = {"simple": "muon"}

#: How a table is extended when more steps than triples are requested (as NVIDIA
#: Emerging-Optimizers does).
DEFAULT_ORDERS: dict[str, str] = {
    "muon": "cycle",
    "quintic": "cycle",
    "polar_express": "repeat_last",
    "cans": "repeat_last",
    "aol": "cycle",
    "turbo_aol": "cycle",
    "deepseekv4": "repeat_last",
    "cubic5": "cycle",
    "aurora": "cycle",
}

ORDERS = ("cycle", "repeat_last")

#: The :func:`rounding_growth` above which a schedule counts as diverging in a dtype (every
#: preset but ``cans`` stays within 1.05 of its exact-arithmetic map in bfloat16, at 1 to
#: 10 steps in either order).
UNSTABLE_GROWTH = 2.0

Coefficients = Union[str, Sequence[Sequence[float]], Sequence[float]]


def _check_triples(coefficients) -> tuple[Triple, ...]:
  """Validates a user table: a sequence of (a, b, c) triples or a single triple, of finite
  real numbers (a NaN or inf coefficient would make every update non-finite)."""
  def bad(what):
    return ValueError(
        f"coefficients must be a preset name (one of {sorted(PRESETS) + sorted(ALIASES)}) or "
        f"a sequence of (a, b, c) triples of finite numbers; got {coefficients!r} ({what}).")

  if isinstance(coefficients, dict):
    raise bad("a dict")
  try:
    seq = list(coefficients)
  except TypeError:
    raise bad("not a sequence") from None
  if not seq:
    raise bad("empty")
  if len(seq) == 3 and all(np.ndim(v) == 0 and not isinstance(v, str) for v in seq):
    seq = [seq]  # a single (a, b, c) triple
  triples = []
  for t in seq:
    if isinstance(t, (str, bytes, dict)):
      raise bad(f"element {t!r}")
    try:
      entries = list(t)
    except TypeError:
      raise bad(f"element {t!r} is not a triple") from None
    if len(entries) != 3:
      raise bad(f"element {t!r} has {len(entries)} entries, not 3")
    try:
      if any(isinstance(v, (str, bytes, bool, complex)) for v in entries):
        raise TypeError
      t = tuple(float(v) for v in entries)
    except (TypeError, ValueError):
      raise bad(f"element {t!r} has a non-number") from None
    if not all(math.isfinite(v) for v in t):
      raise bad(f"element {t!r} is not finite")
    triples.append(t)
  return tuple(triples)


def resolve_coefficients(
    coefficients: Coefficients, steps: int, order: str | None = None
) -> tuple[Triple, ...]:
  """The ``(a, b, c)`` triple used at each of ``steps`` Newton–Schulz steps.

  Args:
    coefficients: a preset name (a key of :data:`PRESETS`, or ``"simple"`` for ``"muon"``)
      or a sequence of ``(a, b, c)`` triples (a single triple is accepted too).
    steps: number of NS steps (>= 1).
    order: how to extend a table shorter than ``steps``: ``"cycle"`` (quintic with 7 steps
      uses triples 1,2,3,4,5,1,2) or ``"repeat_last"`` (keep the last triple). ``None`` picks
      the preset's default (``repeat_last`` for ``polar_express``, ``cans``, ``deepseekv4``;
      ``cycle`` otherwise and for custom tables, as NVIDIA Emerging-Optimizers does).

  Returns:
    A tuple of ``steps`` triples of Python floats.

  Raises:
    ValueError: for an unknown preset / order (listing the choices), ``steps < 1``,
      ``cubic5`` with ``steps != 5``, ``turbo_aol`` with ``steps > 5``, or a malformed table.

  Notes:
    ``turbo_aol`` is Turbo-Muon's schedule: the LAST ``steps`` triples of the Dion
    ``quintic`` table (``table[-steps:]``), i.e. the most aggressive leading triples are
    dropped because the AOL-preconditioned start is already close to orthogonal
    (4 steps -> triples 2..5). Turbo's Python slicing has a quirk: ``iter >= 5`` and
    ``iter == 0`` both yield the whole table, so asking the reference for 6 or more
    iterations silently runs 5. Rather than silently returning fewer triples than asked,
    ``steps > 5`` raises here; ``steps == 5`` is the whole table, like the reference.

  References:
    NVIDIA-NeMo/Emerging-Optimizers (the coefficient sets); K. Jordan et al., "Muon: An
    optimizer for hidden layers in neural networks", 2024,
    https://kellerjordan.github.io/posts/muon/; Amsel, Persson, Musco, Gower, "The Polar
    Express", arXiv 2505.16932, 2025.
  """
  steps = check_int("steps", steps, 1)
  if order is not None:
    check_choice("order", order, ORDERS)

  if isinstance(coefficients, str):
    name = ALIASES.get(coefficients, coefficients)
    if name not in PRESETS:
      raise ValueError(
          f"Unknown coefficients preset {coefficients!r}; choose one of "
          f"{sorted(PRESETS) + sorted(ALIASES)} or pass a sequence of (a, b, c) triples.")
    table = PRESETS[name]
    if name == "cubic5" and steps != 5:
      raise ValueError(f"coefficients='cubic5' is only defined for steps == 5, got steps={steps}.")
    if name == "turbo_aol":
      if steps > len(table):
        raise ValueError(
            f"coefficients='turbo_aol' takes the last `steps` of the {len(table)}-triple quintic "
            f"table, so steps must be <= {len(table)}; got {steps}. (Turbo-Muon's own "
            "table[-iter:] would silently run 5 iterations.) Use 'quintic' for longer schedules.")
      return tuple(table[-steps:])
    default_order = DEFAULT_ORDERS[name]
  else:
    table = _check_triples(coefficients)
    default_order = "cycle"

  order = default_order if order is None else order
  if order == "cycle":
    return tuple(table[i % len(table)] for i in range(steps))
  return tuple(table[min(i, len(table) - 1)] for i in range(steps))


def rounding_growth(triples: Sequence[Sequence[float]], dtype_name: str) -> float:
  """How much rounding to a dtype can raise the singular values a schedule reaches.

  Normalisation puts the singular values in ``[0, 1]`` in exact arithmetic; rounding to
  the iterations' dtype moves one up by as much as ``u``, that dtype's unit roundoff
  (2⁻⁸ in bfloat16), at the input and again after every step. This runs the schedule's
  scalar map on ``σ ∈ [0, 1 + u]`` with each step's result raised by ``u`` and divides
  its largest value by the largest one in exact arithmetic (at least 1). A schedule that
  tolerates its dtype gives about 1; CANS's first polynomial leaves no margin (``p(1) ≈
  1.99``, ``p'(1) ≈ 26``, and the later steps are expansive near 2), and in bfloat16 its
  values grow without bound.

  Args:
    triples: the schedule, as :func:`resolve_coefficients` returns it.
    dtype_name: the iterations' dtype (a name ``ml_dtypes.finfo`` knows, e.g. ``"bfloat16"``).

  Returns:
    The ratio (``inf`` where the rounded map overflows float64; 1 where the exact one
    does).
  """
  triples = _as_key(triples)
  u = float(ml_dtypes.finfo(dtype_name).eps) / 2
  exact = schedule_max(triples, 1.0)
  if math.isinf(exact):  # diverges without rounding: rounding is not what to blame
    return 1.0
  return schedule_max(triples, 1.0 + u, per_step=u) / max(1.0, exact)


def schedule_max(triples: Sequence[Sequence[float]], top: float,
                 per_step: float = 0.0) -> float:
  """The largest ``|σ_k|`` a schedule reaches from ``σ_0 ∈ [0, top]``, with
  ``σ_{i+1} = p_i(σ_i)·(1 + per_step)`` (on a 20,001-point grid; ``inf`` where it
  overflows float64)."""
  return _schedule_max(_as_key(triples), float(top), float(per_step))


def _as_key(triples) -> tuple[Triple, ...]:
  return tuple(tuple(float(v) for v in t) for t in triples)


@functools.lru_cache(maxsize=256)
def _schedule_max(triples: tuple[Triple, ...], top: float, per_step: float) -> float:
  s = np.linspace(0.0, top, 20001)
  with np.errstate(over="ignore", invalid="ignore"):
    for a, b, c in triples:
      s2 = s * s
      s = s * (a + s2 * (b + c * s2)) * (1.0 + per_step)
  top = float(np.max(np.abs(s)))
  return top if math.isfinite(top) else math.inf
