"""``python -m pyro_scorevi``: the command line of :mod:`pyro_scorevi.cli`."""

import sys

from pyro_scorevi.cli import main

sys.exit(main())
