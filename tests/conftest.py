import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The golden files live in ../shared/golden beside the checkout (CI lays it there too).
GOLDEN = Path(os.environ.get("CAT_GOLDEN", REPO.parent / "shared" / "golden"))


def golden_path(*parts):
    """Path inside the golden folder; fails (never skips) when it is missing."""
    p = GOLDEN.joinpath(*parts)
    if not p.exists():
        pytest.fail(f"golden file missing: {p} (expected ../shared/golden beside the checkout)")
    return p
