"""Cityscapes instance segmentation through Detectron2's builtin registration and evaluator.

Detectron2 registers ``cityscapes_fine_instance_seg_{train,val,test}`` on import (under
``$DETECTRON2_DATASETS/cityscapes/{leftImg8bit,gtFine}/<split>``; 8 thing classes, evaluator type
``cityscapes_instance``). Its loader and its evaluator both import ``cityscapesscripts``, an
optional dependency (``pip install 'queryseg[cityscapes]'``). This module adds what QuerySeg
needs around them:

- :func:`require_cityscapesscripts`: an ``ImportError`` that names the extra to install, raised
  before a Cityscapes dataset is loaded or evaluated (instead of a bare ``No module named ...``
  from inside Detectron2 or a pool worker).
- :class:`CityscapesInstanceEvaluator`: Detectron2's evaluator (prediction masks written as PNGs
  into a temporary folder, scored by ``cityscapesscripts.evaluation.
  evalInstanceLevelSemanticLabeling``) with every path the official script would use pointed into
  that temporary folder, whatever ``CITYSCAPES_DATASET`` / ``CITYSCAPES_RESULTS`` hold; the
  script's ``sys.exit`` on a problem turned into an exception carrying its message; its printed
  report sent to the log; and the per-class AP returned besides AP / AP50. cityscapesscripts
  2.3.0 (the latest release) writes ``matches.json`` into the current directory, cannot write
  NumPy 2's scalars to JSON and calls ``np.in1d``, which NumPy 2.4 removed: while it evaluates,
  its module's JSON writer puts relative names into the temporary folder and converts NumPy
  scalars, and its ``np`` has ``in1d`` (``isin`` on the flattened input, what ``in1d`` computed);
  NumPy itself is not modified.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import logging
import os
import types
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
from detectron2.evaluation import CityscapesInstanceEvaluator as _D2CityscapesInstanceEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

logger = logging.getLogger(__name__)

__all__ = ["CITYSCAPES_EXTRA", "CityscapesInstanceEvaluator", "require_cityscapesscripts"]

#: How to install the optional dependency (the ``cityscapes`` extra of setup.cfg).
CITYSCAPES_EXTRA = "pip install 'queryseg[cityscapes]' (or: pip install cityscapesscripts)"


def needs_cityscapesscripts(evaluator_type: str | None) -> bool:
    """True for Detectron2's Cityscapes instance datasets, whose loader (and evaluator) import
    cityscapesscripts."""
    return evaluator_type == "cityscapes_instance"


def require_cityscapesscripts(what: str) -> None:
    """Raise ``ImportError`` naming ``what`` and the extra to install when ``cityscapesscripts``
    (Detectron2's Cityscapes loader and evaluator use it) is not importable."""
    try:
        import cityscapesscripts.helpers.labels  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"{what} needs the optional package cityscapesscripts, which is not installed "
            f"({e}); install it with: {CITYSCAPES_EXTRA}"
        ) from e


class _NumpyWithIn1d(types.ModuleType):
    """NumPy as seen by cityscapesscripts: every attribute of ``numpy``, plus ``in1d``."""

    def __getattr__(self, name: str):
        return getattr(np, name)

    @staticmethod
    def in1d(ar1, ar2, assume_unique: bool = False, invert: bool = False) -> np.ndarray:
        return np.isin(np.ravel(ar1), ar2, assume_unique=assume_unique, invert=invert)


def _to_json(obj):
    """``json.dumps`` default for the script's dicts: NumPy scalars (NumPy 2 returns them from
    ``count_nonzero``) as Python numbers, other objects by their attributes (as the script)."""
    if isinstance(obj, np.generic):
        return obj.item()
    return obj.__dict__


@contextlib.contextmanager
def _official_script(module: types.ModuleType, folder: str) -> Iterator[None]:
    """Run ``evalInstanceLevelSemanticLabeling`` (``module``) against NumPy 2 and inside
    ``folder``, for the duration only.

    - its ``writeDict2JSON`` writes relative names (it writes ``matches.json`` into the current
      directory) into ``folder`` and serialises NumPy scalars;
    - its ``np`` gains ``in1d`` where NumPy no longer has it (NumPy itself is not modified).
    """
    saved = {name: getattr(module, name) for name in ("np", "writeDict2JSON")}

    def write_json(data, file_name: str) -> None:
        path = file_name if os.path.isabs(file_name) else os.path.join(folder, file_name)
        with open(path, "w") as f:
            json.dump(data, f, default=_to_json, sort_keys=True, indent=4)

    module.writeDict2JSON = write_json
    if not hasattr(np, "in1d") and module.np is np:
        module.np = _NumpyWithIn1d("numpy")
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


class CityscapesInstanceEvaluator(_D2CityscapesInstanceEvaluator):
    """Cityscapes instance-level AP (official ``cityscapesscripts`` evaluation).

    ``process`` is Detectron2's: each prediction mask becomes a PNG and a line of
    ``<image>_pred.txt`` in a temporary folder. ``evaluate`` returns
    ``{"segm": {"AP", "AP50", "AP-<class>"...}}`` (percent; a class without ground truth in the
    evaluated images has no AP and is left out of the mean, as in the official script).

    Args:
        dataset_name: a registered dataset whose metadata has ``thing_classes`` (Cityscapes
            label names) and ``gt_dir`` (the ``gtFine/<split>`` folder holding
            ``<city>/*_gtFine_instanceIds.png``).
    """

    def __init__(self, dataset_name: str):
        require_cityscapesscripts(f"evaluating dataset {dataset_name}")
        super().__init__(dataset_name)
        self._dataset_name = dataset_name

    def evaluate(self) -> OrderedDict | None:
        comm.synchronize()
        if comm.get_rank() > 0:
            return None
        import cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling as cs_eval

        gt_dir = PathManager.get_local_path(self._metadata.gt_dir)
        gt_files = sorted(glob.glob(os.path.join(gt_dir, "*", "*_gtFine_instanceIds.png")))
        if not gt_files:
            raise FileNotFoundError(
                f"dataset {self._dataset_name}: no <city>/*_gtFine_instanceIds.png under gt_dir "
                f"{gt_dir} (the official evaluation scores against these PNGs; cityscapesscripts' "
                "preparation/json2instanceImg.py writes them from the polygons)"
            )
        # The script keeps its settings in a module-level `args` whose defaults point into the
        # dataset (CITYSCAPES_DATASET) or its own install folder; point everything it may read
        # or write into this evaluation's temporary folder instead.
        args = cs_eval.args
        args.predictionPath = os.path.abspath(self._temp_dir)
        args.predictionWalk = None
        args.gtInstancesFile = os.path.join(self._temp_dir, "gtInstances.json")
        args.exportFile = os.path.join(self._temp_dir, "resultInstanceLevelSemanticLabeling.json")
        args.JSONOutput = False
        args.colorized = False
        args.quiet = False
        self._logger.info(f"Evaluating {len(gt_files)} images with cityscapesscripts ...")
        report = io.StringIO()
        try:
            with contextlib.redirect_stdout(report), _official_script(cs_eval, self._temp_dir):
                predictions = [cs_eval.getPrediction(gt, args) for gt in gt_files]
                results = cs_eval.evaluateImgLists(predictions, gt_files, args)["averages"]
        except SystemExit as e:  # the script's printError() prints and calls sys.exit
            lines = [ln for ln in report.getvalue().splitlines() if ln.strip()]
            raise RuntimeError(
                f"cityscapesscripts could not evaluate dataset {self._dataset_name}: "
                f"{lines[-1] if lines else 'exit ' + str(e.code)}"
            ) from None
        finally:
            for line in report.getvalue().splitlines():
                if line.strip():
                    self._logger.info(line.rstrip())
        self._working_dir.cleanup()
        segm = OrderedDict(AP=100.0 * results["allAp"], AP50=100.0 * results["allAp50%"])
        for name, per_class in results["classes"].items():
            ap = per_class["ap"]
            if ap == ap:  # NaN: no ground truth of this class
                segm[f"AP-{name}"] = 100.0 * ap
        return OrderedDict(segm=segm)
