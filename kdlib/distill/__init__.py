"""Distillers by name. Each method lives in the module named after its registry name.

=================  =============================  ====================================
name               class                          module
=================  =============================  ====================================
``vanilla``        :class:`Vanilla`               ``kdlib/distill/vanilla.py``
``kd``             :class:`KD`                    ``kdlib/distill/kd.py``
``fitnets``        :class:`FitNets`               ``kdlib/distill/fitnets.py``
``fitnets_kd``     :class:`FitNetsKD`             ``kdlib/distill/fitnets_kd.py``
``aftkd``          :class:`AFTKD`                 ``kdlib/distill/aftkd.py``
``at``             :class:`AT`                    ``kdlib/distill/at.py``
``at_kd``          :class:`ATKD`                  ``kdlib/distill/at_kd.py``
``afd``            :class:`AFD`                   ``kdlib/distill/afd.py``
``lakd``           :class:`LAKD`                  ``kdlib/distill/lakd.py``
``sakd``           :class:`SAKD`                  ``kdlib/distill/sakd.py``
``sam_kd``         :class:`SpatialAttentionKD`    ``kdlib/distill/sam_kd.py``
=================  =============================  ====================================
"""

from kdlib.distill import (  # noqa: F401  (registration)
    afd,
    aftkd,
    at,
    at_kd,
    fitnets,
    fitnets_kd,
    kd,
    lakd,
    sakd,
    sam_kd,
    vanilla,
)
from kdlib.distill.base import (  # noqa: F401
    Distiller,
    IncompatibleModelsError,
    NonFiniteLossError,
    check_finite,
)
from kdlib.distill.kd import kd_loss  # noqa: F401
from kdlib.distill.registry import (  # noqa: F401
    create_distiller,
    distiller_class,
    distiller_options,
    list_distillers,
    method_version,
    register_distiller,
    resolve_options,
)
