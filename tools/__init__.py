"""QuerySeg's tools: benchmark, ablations, converters, complexity and backbone pre-training.

A package for the tests and for each other (``from tools import benchmark``, with the repository
root on ``sys.path``: pytest's ``pythonpath = .``), and each module is also a script
(``python tools/<name>.py``, where ``tools/`` is ``sys.path[0]``). Not installed: Detectron2's
wheel already installs a top-level package named ``tools``.
"""
