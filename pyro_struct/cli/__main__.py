"""``python -m pyro_struct.cli``: the command line."""

import sys

from . import main

sys.exit(main())
