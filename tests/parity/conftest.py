"""The parity suite: QuerySeg against the OpenMMLab reference implementations (issue 18).

Run it with ``make test-parity`` (installs the references, then ``pytest -m parity
tests/parity``). Every test in this folder is marked ``parity`` here; such tests are skipped unless
the ``-m`` expression names ``parity``, so ``make test`` / ``pytest -m "not slow"`` never install
or import the references.

Interface for a parity test (a ``test_*.py`` in this folder):

``mm_refs`` (session fixture)
    Installs (if needed) and activates the references (``parity_refs.py``: mmengine 0.10.7,
    mmcv-lite 2.1.0 with ``mmcv_ext_shim`` as ``mmcv._ext``, mmdet 3.3.0, mmsegmentation 1.2.2,
    in ``.parity_refs/``, never in the venv). Skips with the reason when they cannot be installed
    (no package index); ``QS_PARITY_NO_INSTALL=1`` only uses an existing install. Returns
    ``{"mmengine": "0.10.7", ...}``. Import ``mmdet``/``mmseg`` inside the test (or after this
    fixture), never at module level.
``parity_table`` (session fixture)
    A ``parity_utils.ParityTable``: ``parity_table.check(case, tensor, ours, ref, rtol)`` records
    a row (max abs / relative difference) and asserts ``rel <= rtol``; ``.add`` only records. At
    the end of the session the table is printed and written to ``output/parity/parity_table.md``
    (``QS_PARITY_TABLE`` overrides the path).
``parity_utils``
    ``perturb_state_dict(state, seed)`` (random weights in the reference layout, every tensor,
    BN statistics included), ``diff``, ``mm_config("mmdet", "queryinst/...py")``,
    ``build_mm_model("mmdet", cfg.model)`` (built and ``init_weights()`` run);
    ``KNET_ADE20K_ROWS`` and ``mmseg_knet_reference(mm_cfg_name)`` (K-Net's ADE20K rows and
    their mmseg models, CPU-buildable; also used by ``scripts/knet_ade20k_layouts.py``).
``init_check`` (tests/init_check.py)
    ``init_mismatches(ours_state, expected)`` for the init-parity tests: ``expected`` maps our
    keys to a reference tensor (deterministic ones compared exactly, random ones by mean, std and
    a Kolmogorov-Smirnov test) or an analytic ``Dist``.

Recipe of a forward parity test: build the reference from its wheel config, perturb its
``state_dict`` and load it back, convert that state with the project's converter
(``tools/convert_<method>.py``), load it strictly into the QuerySeg model built from the
config, ``.double()`` both, feed the same normalised, padded input, compare every stage with
``parity_table.check(..., rtol=1e-9)``, then in float32 compare the final labels exactly.
Tests run with one intra-op thread (the machine is shared).
"""

from __future__ import annotations

import os

import parity_refs
import pytest
import torch
from parity_utils import ParityTable

_HERE = os.path.dirname(os.path.abspath(__file__))
_TABLE = ParityTable()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    selected = "parity" in (config.option.markexpr or "")
    skip = pytest.mark.skip(reason="parity suite: run `make test-parity` (pytest -m parity)")
    for item in items:
        if os.path.dirname(str(item.path)).startswith(_HERE):
            item.add_marker(pytest.mark.parity)
            if not selected:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def mm_refs() -> dict[str, str]:
    try:
        if os.environ.get("QS_PARITY_NO_INSTALL") != "1":
            parity_refs.install()
        return parity_refs.activate()
    except parity_refs.RefsUnavailable as exc:
        pytest.skip(f"OpenMMLab references unavailable: {exc}")


@pytest.fixture(scope="session")
def parity_table() -> ParityTable:
    return _TABLE


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not _TABLE.rows:
        return
    text = _TABLE.markdown()
    path = os.environ.get(
        "QS_PARITY_TABLE", os.path.join(parity_refs.REPO, "output", "parity", "parity_table.md")
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    terminalreporter.write_sep("=", f"parity table (also {path})")
    terminalreporter.write(text)
