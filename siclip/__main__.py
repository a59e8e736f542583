"""`python -m siclip …`: the `siclip` command."""

import sys

from siclip.cli import main

sys.exit(main())
