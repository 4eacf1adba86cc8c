import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Under pytest-xdist (`pytest -n auto`) each worker is one process with a core of its own: one torch thread per
# worker, and OMP/MKL told the same so the scripts that tests start as subprocesses inherit it (a test that sets
# its own OMP_NUM_THREADS in a subprocess's env keeps it). Without -n, nothing here changes.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# The golden files ship with the repository (tests/golden); CAT_GOLDEN=DIR points the tests at another set.
GOLDEN = Path(os.environ.get("CAT_GOLDEN", REPO / "tests" / "golden"))


def golden_path(*parts):
    """Path inside the golden folder; fails (never skips) when it is missing."""
    p = GOLDEN.joinpath(*parts)
    if not p.exists():
        pytest.fail(f"golden file missing: {p} (the repository ships them in tests/golden; CAT_GOLDEN overrides)")
    return p


@pytest.fixture(scope="module")
def one_thread():
    """Small convs spend their time in thread hand-offs on a shared 2-core box: one torch thread for a test
    module (use it with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
