"""The devices a test runs on: the CPU always; a CUDA device where one is present (marked `cuda`, so that
`python -m pytest tests -m cuda` runs exactly the CUDA set, and skipped cleanly without one)."""

from __future__ import annotations

import pytest
import torch

CUDA = pytest.param("cuda", marks=[pytest.mark.cuda,
                                   pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")])
DEVICES = ["cpu", CUDA]
