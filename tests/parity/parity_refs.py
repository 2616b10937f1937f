"""The OpenMMLab reference implementations of the parity suite: pinned, installed into a folder
of their own (never into the project's environment) and imported from there.

``python tests/parity/parity_refs.py`` (what ``make test-parity`` runs first) installs them into
``.parity_refs/`` at the repository root (``QS_PARITY_REFS`` overrides the folder) with
``pip install --target --no-deps``: the four references at their pinned versions and the few
pure-Python packages they import that the project's venv lacks (``EXTRA``). torch, torchvision,
numpy, scipy, pycocotools, shapely, matplotlib, OpenCV, PyYAML, termcolor come from the venv.
A stamp file records the pins; a folder whose stamp differs is reinstalled. The install goes to
a temporary sibling folder and is renamed into place, so an interrupted one leaves nothing half
made. ``tests/`` and ``yapftests/`` folders that some wheels put at the top level are removed
(they would shadow nothing on the path, since the folder is appended, but they are not needed).

:func:`activate` appends the folder to ``sys.path`` (after the venv, so no project module can be
shadowed), imports mmcv and registers :mod:`mmcv_ext_shim` as ``mmcv._ext``. Only the parity
conftest calls it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: the references, at the versions the parity tests were written against (issue 18)
REFS = {
    "mmengine": "0.10.7",
    "mmcv-lite": "2.1.0",
    "mmdet": "3.3.0",
    "mmsegmentation": "1.2.2",
}
#: pure-Python packages the references import that the project's venv does not have
EXTRA = {
    "addict": "2.4.0",  # mmengine Config
    "yapf": "0.43.0",  # mmengine Config (pretty text)
    "platformdirs": "4.14.9",  # yapf
    "rich": "15.0.0",  # mmengine logging
    "markdown-it-py": "4.3.0",  # rich
    "mdurl": "0.1.2",  # markdown-it-py
    "terminaltables": "3.1.10",  # mmdet evaluation
    "prettytable": "3.19.0",  # mmseg evaluation
    "ftfy": "6.3.1",  # mmseg.utils.tokenizer (imported by mmseg.utils)
    "wcwidth": "0.9.5",  # ftfy, prettytable
    "regex": "2026.12.2",  # mmseg.utils.tokenizer
    "six": "1.17.0",  # mmdet.models.utils.misc
}
_STAMP = "QS_PARITY_REFS.txt"
_DROP = ("tests", "yapftests", "bin")


class RefsUnavailable(RuntimeError):
    """The references are neither installed nor installable (e.g. no package index)."""


def refs_dir() -> str:
    return os.path.abspath(os.environ.get("QS_PARITY_REFS", os.path.join(REPO, ".parity_refs")))


def _requirements() -> list[str]:
    return [f"{k}=={v}" for k, v in {**REFS, **EXTRA}.items()]


def _stamp_text() -> str:
    return "\n".join(_requirements()) + "\n"


def is_installed(path: str | None = None) -> bool:
    stamp = os.path.join(path or refs_dir(), _STAMP)
    if not os.path.isfile(stamp):
        return False
    with open(stamp) as f:
        return f.read() == _stamp_text()


def install(path: str | None = None, force: bool = False, quiet: bool = True) -> str:
    """Install the references into ``path`` (default :func:`refs_dir`) unless already there.

    Raises:
        RefsUnavailable: pip failed (its last output lines are in the message).
    """
    path = path or refs_dir()
    if is_installed(path) and not force:
        return path
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".parity_refs_tmp_", dir=parent)
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
           "--no-input", "--target", tmp, *_requirements()]  # fmt: skip
    if quiet:
        cmd.insert(4, "-q")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-6:])
        raise RefsUnavailable(
            f"pip could not install the parity references into {path} "
            f"(exit {proc.returncode}):\n{tail}"
        )
    for name in _DROP:
        shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
    with open(os.path.join(tmp, _STAMP), "w") as f:
        f.write(_stamp_text())
    if os.path.exists(path):
        shutil.rmtree(path)
    os.rename(tmp, path)
    return path


def activate(path: str | None = None) -> dict[str, str]:
    """Make the installed references importable in this process and return their versions.

    Raises:
        RefsUnavailable: the folder holds no (or another pinned) installation.
    """
    path = path or refs_dir()
    if not is_installed(path):
        raise RefsUnavailable(
            f"no parity references in {path}; run `python tests/parity/parity_refs.py`"
        )
    if path not in sys.path:
        sys.path.append(path)
    import mmcv_ext_shim

    mmcv_ext_shim.install()
    versions = {}
    for dist, module in (("mmengine", "mmengine"), ("mmcv-lite", "mmcv"), ("mmdet", "mmdet"),
                         ("mmsegmentation", "mmseg")):  # fmt: skip
        mod = importlib.import_module(module)
        if not os.path.abspath(mod.__file__).startswith(path + os.sep):
            raise RefsUnavailable(
                f"{module} is imported from {mod.__file__}, not from {path}: the project's "
                "environment must not hold the references"
            )
        if mod.__version__ != REFS[dist]:
            raise RefsUnavailable(f"{module} {mod.__version__} in {path}, pinned {REFS[dist]}")
        versions[dist] = mod.__version__
    return versions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="reinstall even if up to date")
    parser.add_argument("--path", default=None, help="target folder (default .parity_refs/)")
    args = parser.parse_args(argv)
    path = args.path or refs_dir()
    if is_installed(path) and not args.force:
        print(f"parity references up to date in {path}")  # noqa: T201
        return 0
    try:
        install(path, force=args.force, quiet=False)
    except RefsUnavailable as exc:
        print(exc, file=sys.stderr)  # noqa: T201
        return 1
    print(f"parity references installed in {path}: " + ", ".join(_requirements()))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
