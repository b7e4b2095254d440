"""``python -m difftest.cli``: the ``qcow2lab`` console script without the installed entry point."""

import sys

from difftest.cli import main

sys.exit(main())
