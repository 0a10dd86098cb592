"""The embedded Ray listens on loopback only, whatever the stage imported first, and its token is private."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# `import ray.train` first, as pretrain's driver does: Ray has then read its bind setting before
# pipeline.ray_context could set it. Every listening socket of the driver and of every process the
# embedded Ray started is listed.
SCRIPT = """
import json, os, time
import ray.train  # noqa: F401  (the import order that once put the embedded Ray on every interface)
from pipeline.ray_context import ray_session

with ray_session(num_cpus=1):
    import psutil  # ships with ray[default] (ray/thirdparty_files)
    import ray

    @ray.remote(num_cpus=0)
    def ping():
        return os.getpid()

    ray.get(ping.remote())  # a worker process exists and listens too
    me = psutil.Process()
    listening = []
    for proc in [me, *me.children(recursive=True)]:
        try:
            for c in proc.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    listening.append([proc.name(), c.laddr.ip, c.laddr.port])
        except psutil.Error:
            pass
    print(json.dumps(listening))
"""

LOOPBACK = re.compile(r"^(127\.\d+\.\d+\.\d+|::1|::ffff:127\.\d+\.\d+\.\d+)$")


def test_embedded_ray_listens_on_loopback_only_and_its_token_is_private(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(HOME=str(home), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    listening = json.loads(proc.stdout.strip().splitlines()[-1])
    names = {name for name, _, _ in listening}
    assert "gcs_server" in names and "raylet" in names, listening  # the listing sees Ray's processes
    exposed = [entry for entry in listening if not LOOPBACK.match(entry[1])]
    assert exposed == [], f"listening beyond loopback: {exposed}"
    token = home / ".ray" / "auth_token"
    assert token.is_file() and len(token.read_text().strip()) == 64
    assert token.stat().st_mode & 0o777 == 0o600
