"""`ray start` for a worker node of a loopback-only local cluster (run by path: it imports only Ray).

Ray 2.60 keeps 127.0.0.1 as the node IP only in its single-node mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``,
see ``infra.local_cluster``), and in that mode ``ray start --address`` refuses to start a worker node.
With the variable at 1 the node would resolve 127.0.0.1 to the machine's routable address and could
not reach the loopback-only head. So the variable stays 0 for every Ray process (they all keep loopback)
and only the CLI's refusal is lifted: its module sees a copy of ``ray_constants`` with clusters enabled,
while ``ray._private.services`` (which picks the node IP) still sees the real one.
"""

import sys
import types

import ray._private.ray_constants as ray_constants
from ray.scripts import scripts

if __name__ == "__main__":
    consts = {k: getattr(ray_constants, k) for k in dir(ray_constants) if not k.startswith("__")}
    consts["ENABLE_RAY_CLUSTER"] = True
    scripts.ray_constants = types.SimpleNamespace(**consts)
    sys.exit(scripts.main())
