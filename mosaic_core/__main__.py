"""`python -m mosaic_core COMMAND ...`: see `mosaic_core.cli`."""

import sys

from mosaic_core.cli import main

sys.exit(main())
