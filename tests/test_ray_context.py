"""The embedded local Ray: its workers reach its own state API while another Ray runs on the machine,
their lines reach a log file without colour codes, and known harmless Ray warnings come without a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Ray Train's placement-group cleaner calls the state API from inside the cluster with no address;
# this does the same from a task, and looks for an actor only this cluster has.
SCRIPT = """
import json, os, time, uuid
import ray
from pipeline.ray_context import ray_session

with ray_session(num_cpus=1):
    @ray.remote(num_cpus=0)
    class Probe:
        def ping(self):
            return 1

    name = "probe-" + uuid.uuid4().hex
    probe = Probe.options(name=name).remote()
    ray.get(probe.ping.remote())

    @ray.remote(num_cpus=0)
    def names_seen():
        from ray.util.state import list_actors
        return [a.name for a in list_actors(limit=1000)]

    @ray.remote(num_cpus=0)
    def shout():
        print("worker-line", flush=True)

    @ray.remote(num_cpus=0)
    def warn_with_tracebacks():
        # what a handler of the worker writes (not what reaches the driver later: that is asynchronous)
        import io, logging
        from pipeline.ray_context import ONE_LINE_LOGGERS
        written = {}
        for name, tag in ((ONE_LINE_LOGGERS[0], "harmless-noise"), ("some.other.logger", "real-problem")):
            logger, buf = logging.getLogger(name), io.StringIO()
            handler = logging.StreamHandler(buf)
            logger.addHandler(handler)
            try:
                raise TimeoutError(tag + "-cause")
            except TimeoutError:
                logger.warning(tag + "-warning", exc_info=True)
            logger.removeHandler(handler)
            written[tag] = buf.getvalue()
        return written

    ray.get(shout.remote())
    written = ray.get(warn_with_tracebacks.remote())
    time.sleep(3)  # worker output reaches the driver asynchronously
    print(json.dumps({"name": name, "seen": ray.get(names_seen.remote()), "written": written,
                      "driver_env": os.environ.get("RAY_API_SERVER_ADDRESS")}))
"""


def test_workers_find_their_own_cluster_while_another_ray_runs(ray_local):
    assert ray_local.is_initialized()  # the other Ray on this machine
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["name"] in out["seen"]
    assert out["driver_env"] is None  # set for the cluster's workers only, not the driver's subprocesses
    (line,) = [ln for ln in proc.stdout.splitlines() if "worker-line" in ln]
    assert "\x1b[" not in line and line.endswith("worker-line")  # output to a pipe: no colour codes
    # the known harmless Ray warning keeps its line and loses its traceback; any other keeps both
    written = out["written"]
    assert written["harmless-noise"].strip() == "harmless-noise-warning", written
    assert "real-problem-warning" in written["real-problem"] and "TimeoutError: real-problem-cause" in written["real-problem"]
