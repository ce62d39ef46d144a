import pytest

from tests.checkpoints import write_checkpoint
from tests.worker_server.test_security import TINY


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer checkpoint written by transformers."""
    path = tmp_path_factory.mktemp("tiny")
    write_checkpoint(path, "LlamaForCausalLM", seed=5, **TINY)
    return path
