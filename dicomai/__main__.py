"""Allow ``python -m dicomai``."""

from dicomai.cli import main

raise SystemExit(main())
