"""Root conftest: makes the repository importable and keeps JAX on the CPU in fp32 for tests."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
