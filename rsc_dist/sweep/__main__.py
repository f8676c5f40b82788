import os
import sys

from rsc_dist.sweep.cli import main

try:
    sys.exit(main())
except BrokenPipeError:  # `... | head`: the reader left; not an error of the sweep
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(1)
