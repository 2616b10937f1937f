"""QuerySeg's shared library: matcher, losses, criterion, ops, data and config."""
