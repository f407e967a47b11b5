import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
# the shared sensitivity-analysis cache of this test session, never the user's
os.environ.setdefault("BFQ_CACHE_DIR", tempfile.mkdtemp(prefix="bfq-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def pytest_configure(config):
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.set_num_threads(1)
