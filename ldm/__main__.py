import sys

from ldm.cli import run

sys.exit(run())
