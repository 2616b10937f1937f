"""Checkpoint conversion: ``core`` (safe loading, rules, reports, writing), ``rules`` (rename
rules two converters share: ResNet, FPN, Swin layouts, class lists) and ``cli`` (the command line
of ``tools/convert_*.py``). Nothing is imported here, so ``core`` stays free of the engine."""
