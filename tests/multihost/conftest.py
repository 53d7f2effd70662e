"""The multi-host cluster: one per module, on network namespaces (root only; skipped with the reason
elsewhere). Every test leaves it as it found it: the four nodes up."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.multihost.cluster import Cluster
from tests.multihost.netns import Network, leftovers, unavailable_reason


@pytest.fixture(scope="module")
def cluster(checkpoint_dir, tmp_path_factory) -> Iterator[Cluster]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"multi-host tests: {reason}")
    network = Network()
    local = Cluster(network, tmp_path_factory.mktemp("multihost"), checkpoint_dir)
    try:
        network.create()
        yield local.start()
    except BaseException:
        print(local.log_tails(60))
        raise
    finally:
        local.stop()
        network.close()
        left = leftovers()
        assert not left, f"the harness left {left} behind"
