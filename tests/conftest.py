import sys
from pathlib import Path

# Make tests/helpers.py importable as `helpers` whether or not tests/ is a package.
sys.path.insert(0, str(Path(__file__).resolve().parent))
