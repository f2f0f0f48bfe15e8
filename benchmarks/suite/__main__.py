"""``python3 -m benchmarks.suite``: see :mod:`benchmarks.suite.runner`."""

from .runner import main

main()
