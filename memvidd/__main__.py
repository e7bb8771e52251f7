"""``python -m memvidd`` is the ``memvidd`` command."""

from memvidd.cli import main

raise SystemExit(main())
