from pathlib import Path

import os

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# TIEDMASK_TEST_THREADS=1 leaves a core to a benchmark running beside the tests.
torch.set_num_threads(int(os.environ.get("TIEDMASK_TEST_THREADS", "2")))


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "cifar-10-batches-py").exists():
        pytest.skip("../shared/data is not beside the project")
    return SHARED_DATA
