from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

torch.set_num_threads(2)


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "cifar-10-batches-py").exists():
        pytest.skip("../shared/data is not beside the project")
    return SHARED_DATA
