"""A finished run exits 0 on every rank: ``distributed.entry_point`` drains every process group, destroys them, frees
what still holds them and flushes, in that order (ds_distill/runtime/distributed.py)."""

import subprocess
import sys
import textwrap
from pathlib import Path

from ds_distill.runtime import distributed
from ds_distill.runtime.distributed import destroy as real_destroy  # conftest keeps the session's group alive
from tests.launch import free_port, launcher_env

ROOT = Path(__file__).resolve().parent.parent


def test_teardown_order(monkeypatch):
    """Finished body: a barrier on every group in name order, then destroy_process_group, gc, flush. A body that fails
    skips the barriers (a peer may be stuck in another collective), writes its error line first, and still destroys
    and flushes."""
    import gc

    import torch.distributed as dist

    calls = []
    groups = {"g_default": "0", "g_clone": "2", "g_sub": "10"}  # sorted by name: "0" < "10" < "2"
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(type(dist.distributed_c10d._world), "pg_names", property(lambda self: groups))
    monkeypatch.setattr(dist, "barrier", lambda group=None: calls.append(("barrier", group)))
    monkeypatch.setattr(dist, "destroy_process_group", lambda group=None: calls.append(("destroy", group)))
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append(("gc",)) or 0)
    monkeypatch.setattr(sys.stderr, "flush", lambda: calls.append(("flush stderr",)))
    monkeypatch.setattr(distributed, "destroy", real_destroy)

    assert distributed.entry_point(lambda: 0) == 0
    assert calls == [
        ("barrier", "g_default"),
        ("barrier", "g_sub"),
        ("barrier", "g_clone"),
        ("destroy", None),
        ("gc",),
        ("flush stderr",),
    ]

    calls.clear()

    def fails():
        raise distributed.UsageError("bad flag")

    monkeypatch.setattr(distributed, "print_error", lambda message: calls.append(("error", str(message))))
    assert distributed.entry_point(fails) == 2
    assert calls == [("error", "bad flag"), ("destroy", None), ("gc",), ("flush stderr",)]


# Two ranks end with an all-gather in flight on a second group that nobody waits for (a ZeRO-3 prefetch), its tensors
# carrying Python attributes (as ZeRO-3 parameters do), the group held by a reference cycle (as an engine holds it).
RANK_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch, torch.distributed as dist
    from ds_distill.runtime import distributed

    class Engine:
        pass

    def body():
        world = distributed.init_distributed()
        engine = Engine()
        engine.me, engine.group = engine, dist.new_group(list(range(world.world_size)))
        x = torch.ones(4_000_000) * world.rank
        x.ds_id = world.rank
        if world.rank == 1:
            time.sleep(0.3)  # rank 0 reaches the end while the gather is still running
        dist.all_gather([torch.empty_like(x) for _ in range(2)], x, group=engine.group, async_op=True)
        print(f"rank {world.rank} body done", flush=True)
        return 0

    sys.exit(distributed.entry_point(body))
    """
)


def test_two_ranks_with_work_in_flight_exit_0(tmp_path):
    """Both ranks exit 0 with nothing on stderr beyond the log (no 'terminate called'), five times over."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    for _ in range(5):
        port = str(free_port())
        procs = [
            subprocess.Popen(
                [sys.executable, str(script)],
                cwd=ROOT,
                env=launcher_env(
                    PYTHONPATH=str(ROOT),
                    RANK=str(r),
                    LOCAL_RANK=str(r),
                    WORLD_SIZE="2",
                    LOCAL_WORLD_SIZE="2",
                    MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=port,
                ),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for r in range(2)
        ]
        outs = [p.communicate(timeout=300)[0] for p in procs]
        for r, (p, out) in enumerate(zip(procs, outs)):
            assert p.returncode == 0 and f"rank {r} body done" in out and "terminate called" not in out, out[-3000:]
