import os
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def tracemesh_cmd() -> list[str]:
    """The installed console script, as users run it."""
    exe = BIN / "tracemesh"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "tracemesh"]


@pytest.fixture(autouse=True, scope="session")
def _no_proxy_env():
    # A developer's HTTP_PROXY must not capture the tests' loopback traffic.
    for k in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        os.environ.pop(k, None)
    os.environ["NO_PROXY"] = "127.0.0.1,localhost"
