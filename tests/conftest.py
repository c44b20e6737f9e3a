"""Shared test set-up: one thread per process (2-core CI runs two pytest workers) and common paths."""

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "examples" / "specs"
HF_CONFIGS = ROOT / "tests" / "data" / "hf"


@pytest.fixture
def specs() -> Path:
    return SPECS


@pytest.fixture
def hf_configs() -> Path:
    return HF_CONFIGS
