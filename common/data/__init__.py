"""QuerySeg data: dataset mappers, the built-in ``shapes`` dataset and the evaluator factory.

``import common.data`` registers the ``shapes_*`` datasets (their files are generated on first
use, see ``common.data.shapes``).
"""

import warnings

# registers the shapes_*, shapes_vis_* and ytvis_2019_* datasets
from . import shapes, shapes_vis, ytvis  # noqa: F401
from .evaluation import build_evaluator
from .shapes import configure_shapes_from_cfg, register_shapes

# `python -m common.data.shapes` imports this package (hence the module) before running it as
# __main__, for which runpy warns; the CLI does not depend on the imported copy.
warnings.filterwarnings(
    "ignore", message=r".*'common\.data\.shapes' found in sys\.modules", category=RuntimeWarning
)

__all__ = ["build_evaluator", "configure_shapes_from_cfg", "register_shapes"]
