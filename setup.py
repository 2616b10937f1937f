"""Install QuerySeg: ``common`` plus one package per project under ``projects/<p>/<p>``.

Each project declares itself to ``common`` through the entry-point group ``queryseg.projects``
(``setup.cfg``); nothing in ``common`` names a project.

The C++/CUDA ops (``common/ops/csrc``) are compiled here only when ``QS_BUILD_OPS=1`` or when a CUDA
toolkit and a GPU are both present; otherwise the pure-PyTorch implementations are used, and the ops
can be JIT-built later (``common.ops.build``).
"""

import os

from setuptools import find_packages, setup

PROJECTS = ("knet", "queryinst", "fastinst", "embedmask")


def _packages():
    pkgs, dirs = find_packages(include=["common", "common.*"]), {}
    for p in PROJECTS:
        root = os.path.join("projects", p)
        for sub in find_packages(root, include=[p, f"{p}.*"]):
            pkgs.append(sub)
            dirs[sub] = os.path.join(root, *sub.split("."))
    return pkgs, dirs


def _ext_modules():
    want = os.environ.get("QS_BUILD_OPS", "auto")
    if want == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return [], {}
    if want == "auto" and not (torch.cuda.is_available() and CUDA_HOME):
        return [], {}
    # load common/ops/build.py by path: setup.py runs before the package is importable
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location(
        "_qs_ops_build", os.path.join(here, "common", "ops", "build.py")
    )
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build.extension_for_setup()


packages, package_dir = _packages()
ext_modules, cmdclass = _ext_modules()
setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"common": ["configs/**/*.yaml"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
