"""``python -m rsc_dist.results``: see rsc_dist.results.tables."""

import sys

from rsc_dist.results.tables import main

sys.exit(main())
