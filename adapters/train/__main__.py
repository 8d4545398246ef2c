"""`python -m loraplex.adapters.train ...` = `loraplex train ...` (see adapters/train/cli.py)."""

from loraplex.adapters.train.cli import main

raise SystemExit(main())
