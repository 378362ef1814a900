"""Shared fixtures: tiny random MoE checkpoints built from configs and saved with `save_pretrained`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny_models import TINY_CONFIGS, EMBEDDED_MODEL_DIR, save_tiny_model

# Test models are tiny: one intra-op thread avoids OpenMP spin-waiting, which costs 100x on a busy 2-core box.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved checkpoint per supported family, keyed by family name."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {name: save_tiny_model(name, root / name) for name in TINY_CONFIGS}


@pytest.fixture(scope="session")
def tiny_mixtral_dir(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["mixtral"]


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    return EMBEDDED_MODEL_DIR


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
