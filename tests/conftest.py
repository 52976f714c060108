"""Test-wide settings: Triton runs in its CPU interpreter, and results are reproducible."""
import os

# Must be set before triton is imported anywhere: there is no GPU on CI.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist (`make test` runs two workers on CI's two cores) each worker gets one
# intra-op thread: two workers each spawning two threads would oversubscribe the machine and
# run slower than one worker.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
