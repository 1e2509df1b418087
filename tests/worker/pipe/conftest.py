import pytest

from tests.worker.pipe.harness import run_ranks
from tests.worker.pipe.scenarios import world_of_four


@pytest.fixture(scope="session")
def four_ranks(tmp_path_factory):
    """One 4-rank process group shared by the tests that need four ranks (spawning is the slow part)."""
    ckpt = tmp_path_factory.mktemp("ckpt-2-to-4")
    return ckpt, run_ranks(world_of_four, 4, str(ckpt), timeout=400)
