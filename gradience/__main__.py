"""``python -m gradience``: the same as the ``gradience`` console script."""

from gradience.cli import main

raise SystemExit(main())
