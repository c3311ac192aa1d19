"""ortho-optax: orthogonalized optimizers (the Muon family) as composable Optax transforms.

Every optimizer is an ``optax.GradientTransformation`` assembled from stages that can be
used alone or recombined with ``optax.chain``::

    momentum -> orthogonalize -> second moment -> scale -> decay

Optimizers: :func:`muon`, :func:`turbo_muon`, :func:`auon`, :func:`hybrid_auon`,
:func:`aurora`, :func:`riemannian_aurora`, :func:`adaptive_muon` (and its presets
:func:`normuon`, :func:`adamuon`, :func:`namo`), :func:`oadamw`.

Plain functions: :func:`newton_schulz` (:func:`newton_schulz_many` for several arrays at
once), :func:`gram_newton_schulz`, :func:`polar`, :func:`aurora_polar`,
:func:`leverage_uniform_polar`, :func:`riemannian_balanced_polar`,
:func:`cosh_normalize`, :func:`polar_express_coefficients`.

GPU kernels live in ``ortho_optax.pallas``; the validation GPT, data and the
``ortho-optax`` command in ``ortho_optax.models``.
"""

import os as _os

# In a source checkout `pallas/` and `models/` sit beside this package; pyproject maps them to
# `ortho_optax.pallas` / `ortho_optax.models` on install. When the checkout itself is first on
# sys.path (running from the repository root, or an install whose editable finder is shadowed
# by the local folder), let the same import names resolve to those folders.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if (not _os.path.isdir(_os.path.join(__path__[0], "pallas"))
    and _os.path.isfile(_os.path.join(_root, "pallas", "__init__.py"))
    and _os.path.isfile(_os.path.join(_root, "pyproject.toml"))):
  __path__.append(_root)

from ortho_optax import distributed
from ortho_optax.coefficients import PRESETS, resolve_coefficients
from ortho_optax.distributed import distribute, fsdp_shardings
from ortho_optax.matrix_view import (
    FLAX_LAYOUT,
    TORCH_LAYOUT,
    MatrixDims,
    resolve_dims,
    to_matrices,
)
from ortho_optax.gram_newton_schulz import gram_newton_schulz
from ortho_optax.newton_schulz import newton_schulz, newton_schulz_many
from ortho_optax.polar import (
    aurora_polar,
    cosh_normalize,
    leverage_uniform_polar,
    polar,
    riemannian_balanced_polar,
)
from ortho_optax.polar_express import polar_express_coefficients
from ortho_optax import routing
from ortho_optax.routing import (
    default_label_fn,
    dims_from_model,
    label_by_path,
    label_from_model,
    routing_report,
)
from ortho_optax.stages.decay import (
    add_weight_decay,
    scale_by_learning_rate_and_decay,
    weight_decay_stages,
)
from ortho_optax.stages.kahan import kahan_summation
from ortho_optax.stages.momentum import ema_momentum
from ortho_optax.stages.orthogonalize import orthogonalize, scale_by_cosh_norm
from ortho_optax.stages.scale import scale_by_shape
from ortho_optax.stages.second_moment import scale_by_namo, scale_by_second_moment
from ortho_optax.stages.stable_adamw import stable_adamw
from ortho_optax.optimizers._common import with_adamw_fallback
from ortho_optax.optimizers.adaptive_muon import adaptive_muon, adamuon, namo, normuon
from ortho_optax.optimizers.auon import auon, auon_adam, hybrid_auon
from ortho_optax.optimizers.aurora import (
    aurora,
    nonfinite_count,
    riemannian_aurora,
    skip_nonfinite_updates,
)
from ortho_optax.optimizers.muon import inject_static_args, muon
from ortho_optax.optimizers.oadamw import oadamw
from ortho_optax.optimizers.turbo_muon import turbo_muon

__version__ = "0.1.0"

#: Every optimizer of the library, by name.
OPTIMIZERS = {
    "muon": muon,
    "turbo_muon": turbo_muon,
    "auon": auon,
    "hybrid_auon": hybrid_auon,
    "aurora": aurora,
    "riemannian_aurora": riemannian_aurora,
    "adaptive_muon": adaptive_muon,
    "normuon": normuon,
    "adamuon": adamuon,
    "namo": namo,
    "oadamw": oadamw,
}
