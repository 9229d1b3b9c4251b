"""Entry point frozen into the single `spike` executable."""

from spike.app.cli import main

raise SystemExit(main())
