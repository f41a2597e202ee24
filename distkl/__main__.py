"""`python -m distkl`: the same as the `distkl` command."""

from distkl.cli import main

raise SystemExit(main())
