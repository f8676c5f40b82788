import sys

from rsc_dist.sweep.cli import main

sys.exit(main())
