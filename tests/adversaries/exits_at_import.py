"""A plugin module with a stray module-level argparse: it calls sys.exit(0) when imported."""

import sys

sys.exit(0)
