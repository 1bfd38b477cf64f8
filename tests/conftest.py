from pathlib import Path

import os

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# TIEDMASK_TEST_THREADS=1 leaves a core to a benchmark running beside the tests.
torch.set_num_threads(int(os.environ.get("TIEDMASK_TEST_THREADS", "2")))


@pytest.fixture(autouse=True)
def untimed_precision(monkeypatch):
    """`precision: auto` by the instruction set alone in tests: its timed check (CPUs with AMX or
    AVX512-BF16) could choose differently for two runs a test compares, when the cores are busy.
    test_precision.py turns the check back on for its own tests."""
    monkeypatch.setenv("TIEDMASK_PRECISION_CHECK", "0")


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "cifar-10-batches-py").exists():
        pytest.skip("../shared/data is not beside the project")
    return SHARED_DATA
