"""``python -m rsc_dist.results``: see rsc_dist.results.cli."""

import sys

from rsc_dist.results.cli import main

sys.exit(main())
