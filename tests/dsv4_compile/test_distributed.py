"""distributed.py's process lifetime: the world a command joins is left before interpreter teardown."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

# Registered before join_world, so it runs after join_world's own exit handler (atexit is last-in,
# first-out): what it sees is what interpreter teardown would meet.
SCRIPT = textwrap.dedent("""
    import atexit
    import torch
    import torch.distributed as dist
    from dsv4_compile.distributed import join_world
    from dsv4_compile.model.parallel import ParallelLayout

    atexit.register(lambda: print("group alive at teardown:", dist.is_initialized(), flush=True))
    join_world(ParallelLayout(tp=1, ep=1), cuda=False, argv=["verify"])
    box = torch.ones(1)
    dist.all_reduce(box)
    print("all_reduce:", box.item(), flush=True)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_joined_world_is_left_before_interpreter_teardown():
    """A gloo group left to teardown once aborted a rank after its verify passed ("terminate called
    without an active exception", exit -6): join_world destroys it at exit."""
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "all_reduce: 1.0" in proc.stdout
    assert "group alive at teardown: False" in proc.stdout, proc.stdout
