"""swarmshard: decentralized sharded inference on heterogeneous, untrusted machines."""

import os as _os

# OpenMP (libgomp, torch's CPU thread pool) keeps each idle worker spinning (300k iterations by
# default, about 5 ms of busy CPU measured here) after every parallel region. Swarm processes that
# share a machine take turns: a server's or client's spinning workers steal the cores the next
# node in the chain computes on, which made each span's decode step ~1.5x slower. A
# shorter spin still bridges the gaps between the matmuls of one forward pass. It only takes
# effect when swarmshard is imported before torch; an explicit setting always wins.
_os.environ.setdefault("GOMP_SPINCOUNT", "50000")

__version__ = "0.1.0"
