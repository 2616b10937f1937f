"""Build QuerySeg's compiled ops (``common/ops/csrc``) into one extension.

Two ways in:

- ``extension_for_setup()``: the extension for the project's ``setup.py``, named ``common._C``.
  ``setup.py`` asks for it when ``QS_BUILD_OPS=1`` or when a GPU and a CUDA toolkit are present,
  e.g. ``QS_BUILD_OPS=1 TORCH_CUDA_ARCH_LIST="9.0" pip install -e .`` (9.0 = H100/H200).
- ``load()``: a JIT build with ``torch.utils.cpp_extension.load`` (needs ninja), cached in
  ``default_build_directory()`` (under ``$TORCH_EXTENSIONS_DIR``, default
  ``~/.cache/torch_extensions``). ``compiled_ops()`` does this on first use when
  ``QS_BUILD_OPS=1`` is set and no prebuilt ``common._C`` is importable. A cold CPU-only build
  takes ~30 s on 2 free cores; with CUDA for one architecture, ~1-3 min.

Environment:

- ``TORCH_CUDA_ARCH_LIST``: CUDA architectures to compile for (e.g. ``"8.0;9.0"``); read by
  ``torch.utils.cpp_extension``. Unset, PyTorch compiles for the visible GPU, or for every
  architecture it supports when none is visible (slow).
- ``QS_OPS_CUDA``: ``auto`` (default), ``1`` (require the CUDA kernels) or ``0`` (CPU kernels only).
  ``auto`` compiles CUDA kernels when a CUDA toolkit is found; for a JIT build it also needs a GPU.
- ``CUDA_HOME``/``CUDA_PATH``: the toolkit. When unset, or when PyTorch's guess has no headers
  (``nvcc`` on the PATH may be a wrapper script outside the toolkit), ``cuda_home()`` searches
  ``nvcc``'s real location, ``/usr/local/cuda`` and ``/usr/local/cuda-*``.
"""

from __future__ import annotations

import glob
import importlib
import logging
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import torch

__all__ = [
    "cuda_home",
    "compiled_ops",
    "default_build_directory",
    "extension_for_setup",
    "jit_build_is_fresh",
    "load",
    "sources",
]

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).resolve().parent / "csrc"
_REPO_ROOT = _CSRC.parents[2]
EXTENSION_NAME = "common._C"
_CXX_FLAGS = ["-O3"]
_NVCC_FLAGS = ["-O3"]
# The CPU kernels use at::parallel_for, which is serial unless compiled with OpenMP (as PyTorch is).
_OPENMP_FLAGS = ["-fopenmp"] if sys.platform.startswith("linux") else []


def sources(with_cuda: bool) -> list[Path]:
    """The C++ (and, with ``with_cuda``, CUDA) source files of the extension, absolute paths."""
    cpp = sorted(_CSRC.glob("*.cpp"))
    return cpp + (sorted(_CSRC.glob("*.cu")) if with_cuda else [])


def _is_toolkit(path: str | None) -> bool:
    return (
        bool(path)
        and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))
        and (os.path.isfile(os.path.join(path, "bin", "nvcc")))
    )


def cuda_home() -> str | None:
    """Find a usable CUDA toolkit (headers and nvcc) and point ``torch.utils.cpp_extension`` at it.

    Returns:
        The toolkit folder, or None when there is none (or when PyTorch is a CPU-only build).
    """
    if torch.version.cuda is None:
        return None
    from torch.utils import cpp_extension

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for path in candidates:
        if _is_toolkit(path):
            if cpp_extension.CUDA_HOME != path:
                logger.info("Using the CUDA toolkit at %s", path)
            # cpp_extension reads this module global when it builds include paths and calls nvcc.
            cpp_extension.CUDA_HOME = path
            os.environ["CUDA_HOME"] = path
            return path
    return None


def _want_cuda(jit: bool) -> bool:
    mode = os.environ.get("QS_OPS_CUDA", "auto").lower()
    if mode in ("0", "false", "no", "off"):
        return False
    home = cuda_home()
    if mode in ("1", "true", "yes", "on"):
        if home is None:
            raise RuntimeError(
                "QS_OPS_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME to a folder with "
                "bin/nvcc and include/cuda_runtime.h) or PyTorch is a CPU-only build."
            )
        return True
    return home is not None and (torch.cuda.is_available() or not jit)


def _build_args(with_cuda: bool) -> dict:
    cxx = _CXX_FLAGS + _OPENMP_FLAGS
    return {
        "define_macros": [("WITH_CUDA", None)] if with_cuda else [],
        "extra_compile_args": {"cxx": cxx, "nvcc": list(_NVCC_FLAGS)}
        if with_cuda
        else {"cxx": cxx},
        "extra_link_args": list(_OPENMP_FLAGS),
    }


def extension_for_setup() -> tuple[list, dict]:
    """The ``common._C`` extension and the ``build_ext`` command for ``setup.py``.

    Returns:
        ``(ext_modules, cmdclass)``: one ``CUDAExtension`` (CPU and CUDA kernels) when a CUDA
        toolkit is found (see ``QS_OPS_CUDA``), otherwise one ``CppExtension`` (CPU kernels).
    """
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = _want_cuda(jit=False)
    srcs = [os.path.relpath(p, _REPO_ROOT) for p in sources(with_cuda)]
    ext_cls = CUDAExtension if with_cuda else CppExtension
    ext = ext_cls(EXTENSION_NAME, srcs, include_dirs=[str(_CSRC)], **_build_args(with_cuda))
    return [ext], {"build_ext": BuildExtension}


def _jit_name(with_cuda: bool) -> str:
    return "queryseg_ops_cuda" if with_cuda else "queryseg_ops_cpu"


def default_build_directory(with_cuda: bool) -> str:
    """JIT build folder: ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``)
    ``/queryseg-py<X.Y>-torch<version>/<name>``, so a build never meets another torch's ABI."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "torch_extensions"
    )
    tag = f"queryseg-py{sys.version_info[0]}.{sys.version_info[1]}-torch{torch.__version__}"
    return os.path.join(root, tag.replace("+", "_"), _jit_name(with_cuda))


def jit_build_is_fresh(with_cuda: bool, build_directory: str | None = None) -> bool:
    """Whether a JIT build exists that is newer than every source, so ``load()`` is instant."""
    folder = build_directory or default_build_directory(with_cuda)
    so = os.path.join(folder, f"{_jit_name(with_cuda)}.so")
    if not os.path.isfile(so):
        return False
    newest = max(p.stat().st_mtime for p in [*sources(with_cuda), *_CSRC.glob("*.h")])
    return os.path.getmtime(so) > newest


def load(
    with_cuda: bool | None = None, build_directory: str | None = None, verbose: bool = False
) -> ModuleType:
    """JIT-compile (or reuse a cached build of) the extension and import it.

    Args:
        with_cuda: compile the CUDA kernels too; None decides as ``QS_OPS_CUDA`` says.
        build_directory: where to build; None uses ``default_build_directory``, where
            unchanged sources are not rebuilt.
        verbose: show the compiler commands.

    Returns:
        The extension module (``ms_deform_attn_forward``, ``ms_deform_attn_backward``,
        ``with_cuda``).
    """
    from torch.utils.cpp_extension import load as _load

    if with_cuda is None:
        with_cuda = _want_cuda(jit=True)
    elif with_cuda and cuda_home() is None:
        raise RuntimeError("with_cuda=True but no CUDA toolkit was found (set CUDA_HOME)")
    args = _build_args(with_cuda)
    macros = [f"-D{name}" for name, _ in args["define_macros"]]
    build_directory = build_directory or default_build_directory(with_cuda)
    os.makedirs(build_directory, exist_ok=True)
    return _load(
        name=_jit_name(with_cuda),
        sources=[str(p) for p in sources(with_cuda)],
        extra_include_paths=[str(_CSRC)],
        extra_cflags=args["extra_compile_args"]["cxx"] + macros,
        extra_cuda_cflags=(args["extra_compile_args"]["nvcc"] + macros) if with_cuda else None,
        extra_ldflags=args["extra_link_args"],
        build_directory=build_directory,
        with_cuda=with_cuda,
        verbose=verbose,
    )


_UNSET = object()
_compiled: object = _UNSET


def compiled_ops() -> ModuleType | None:
    """The compiled ops module, or None when there is none; looked up once per process.

    Order: an installed ``common._C`` (``setup.py``); else, when ``QS_BUILD_OPS=1``, a JIT build
    (``load()``); else None, and callers use the pure-PyTorch implementations.
    """
    global _compiled
    if _compiled is _UNSET:
        _compiled = _find_compiled()
    return _compiled  # type: ignore[return-value]


def _find_compiled() -> ModuleType | None:
    try:
        return importlib.import_module(EXTENSION_NAME)
    except ModuleNotFoundError:
        pass
    except ImportError as e:  # present but built for another torch/CUDA: say so, fall back
        logger.warning("Cannot load %s (%s); rebuild it or set QS_BUILD_OPS=1.", EXTENSION_NAME, e)
    if os.environ.get("QS_BUILD_OPS", "0") == "1":
        logger.info("QS_BUILD_OPS=1: JIT-building QuerySeg's ops (cached after the first time)")
        return load()
    return None
