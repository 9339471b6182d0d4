import os
import sys
from pathlib import Path

import torch

# Make tests/helpers.py importable as `helpers` whether or not tests/ is a package.
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Without a GPU, Triton kernels run in its interpreter; the switch must be set before the first
# kernel is loaded, so here, before any test module imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
