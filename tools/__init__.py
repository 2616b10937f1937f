"""QuerySeg's tools: benchmark, ablations, converters, complexity and backbone pre-training.

An importable package (``from tools import benchmark``), installed with QuerySeg; each module is
also a script (``python tools/<name>.py``).
"""
