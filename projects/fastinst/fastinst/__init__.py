"""FastInst (CVPR 2023) as a QuerySeg/Detectron2 project.

Importing the package registers the ``FastInst`` meta-architecture, the ``FastInstHead`` and its
``location``/``proposal_location`` costs and ``proposals`` loss; ``add_fastinst_config`` adds
``MODEL.FASTINST.*``. Its pixel decoders (``PyramidPoolingModuleFPN``/``BaseFPN``, also K-Net's
optional neck) live in ``common.modeling.ppm_fpn``.
"""

from . import fastinst as _meta_arch  # noqa: F401  (registers FastInst)
from . import head as _head  # noqa: F401  (registers FastInstHead)
from . import losses as _losses  # noqa: F401  (registers its cost and loss terms)
from .config import add_fastinst_config, finalize_fastinst_config
from .decoder import FastInstDecoder
from .fastinst import FastInst, build_fastinst_criterion
from .query_proposal import QueryProposal, local_maximum_map

__all__ = [
    "add_fastinst_config",
    "finalize_fastinst_config",
    "FastInst",
    "FastInstDecoder",
    "QueryProposal",
    "build_fastinst_criterion",
    "local_maximum_map",
]
