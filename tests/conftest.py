"""Suite-wide guards."""

from __future__ import annotations

import pytest
import torch.distributed as dist


@pytest.fixture(autouse=True)
def fresh_process_group():
    """Every test starts without torch.distributed's default process group. Many tests train in-process through
    ``run_recipe(..., init_distributed())``, which leaves its one-process gloo group behind (harmless to the next
    ``init_distributed``, which reuses it), but a test that calls ``dist.init_process_group`` itself then failed
    with "trying to initialize the default process group twice", far from the test that left the group."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
