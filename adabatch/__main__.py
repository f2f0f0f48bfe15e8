"""``python -m adabatch``: the same command line as the ``adabatch`` script."""

from .cli import main

raise SystemExit(main())
