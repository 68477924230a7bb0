"""One expert-parallel model replica in Ray: N rank actors in a STRICT_PACK placement group on one node.

The Ray Data model actor (`Generate`) is the group's leader: it creates the placement group and the
ranks, and sends each item of its batches to the rank with the fewest items in flight. Each rank joins
a torch.distributed group (NCCL on GPU, gloo on CPU), loads its share of the routed experts and runs
its own `Engine`, whose steps are collective (model/engine.py). The ranks are owned by the leader: when
one dies the leader kills the others, frees the placement group and exits, and Ray Data restarts the
leader (a fresh group) and retries its in-flight batches.
"""
from __future__ import annotations

import asyncio
import datetime
import json
import os
from pathlib import Path

import numpy as np
import ray
import torch

from pipeline.config import JobConfig

READY_TIMEOUT_S = 600
# Placement groups made inside an actor live as long as the job's driver, not the actor: a driver that runs
# two jobs (the Python API) would find the first job's groups still holding its CPUs/GPUs. Each is named
# PG_PREFIX + the run's tag, and `remove_groups(tag)` frees them when the run ends.
PG_PREFIX = "pagemill-ep-"


@ray.remote(max_restarts=0)
class Rank:
    """One rank of the group: its model shard and engine."""

    def store(self) -> tuple[str, int]:
        """Rank 0 hosts the group's rendezvous on a port the OS picks."""
        self._store = torch.distributed.TCPStore("0.0.0.0", 0, is_master=True, wait_for_workers=False)
        return ray.util.get_node_ip_address(), self._store.port

    def setup(self, config: JobConfig, model_path: str, rank: int, world: int, addr: tuple[str, int],
              crash_marker: str | None) -> None:
        from model import Engine, load_pretrained
        from pipeline.generate import engine_limits, pick_device, pick_dtype

        device = pick_device(config.device)
        if device.type == "cpu":
            torch.set_num_threads(config.model_threads or max(1, int(config.cpus_per_model_worker)))
        else:
            torch.cuda.set_device(0)  # Ray gives each rank actor its own GPU
        timeout = datetime.timedelta(seconds=READY_TIMEOUT_S)
        store = getattr(self, "_store", None) or torch.distributed.TCPStore(
            addr[0], addr[1], is_master=False, timeout=timeout)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                                             world_size=world, timeout=timeout)
        self.model, self.processor = load_pretrained(model_path, device=str(device),
                                                     dtype=pick_dtype(config.dtype, device), expert_parallel=True)
        self.engine = Engine(self.model, self.processor, **engine_limits(config)).start()
        self.crash_marker = crash_marker if rank == world - 1 else None

    async def run(self, packed: bytes, params):
        from pipeline.preprocess import unpack_arrays

        if self.crash_marker and not os.path.exists(self.crash_marker):
            Path(self.crash_marker).write_text(json.dumps({"pid": os.getpid()}))
            os._exit(1)
        arrays = unpack_arrays(packed)
        rows = arrays.pop("image_rows", None)
        prep = self.processor.unpack(arrays, pixels=True)  # the engine normalizes them on its device
        rows = torch.from_numpy(np.array(rows)) if rows is not None else None
        return await asyncio.wrap_future(self.engine.submit(prep, params, rows))


class Group:
    """The leader's handle on its ranks."""

    def __init__(self, config: JobConfig, model_path: str, gpus: float, crash_marker: str | None = None,
                 tag: str = ""):
        import uuid

        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        n = config.expert_parallel_size
        bundle = {"CPU": config.cpus_per_model_worker} | ({"GPU": gpus} if gpus else {})
        self.pg = placement_group([bundle] * n, strategy="STRICT_PACK", name=f"{PG_PREFIX}{tag}-{uuid.uuid4().hex[:12]}")
        ray.get(self.pg.ready(), timeout=READY_TIMEOUT_S)
        self.ranks = [
            Rank.options(num_cpus=config.cpus_per_model_worker, num_gpus=gpus,
                         scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r)
                         ).remote()
            for r in range(n)]
        addr = ray.get(self.ranks[0].store.remote(), timeout=READY_TIMEOUT_S)
        ray.get([rank.setup.remote(config, model_path, r, n, addr, crash_marker) for r, rank in enumerate(self.ranks)],
                timeout=READY_TIMEOUT_S)
        self.load = [0] * n

    async def run(self, packed: bytes, params):
        """One item on the least-loaded rank. A dead rank ends the leader (see the module docstring)."""
        r = min(range(len(self.ranks)), key=self.load.__getitem__)
        self.load[r] += 1
        try:
            return await self.ranks[r].run.remote(packed, params)
        except ray.exceptions.RayActorError:
            self.abort()
        finally:
            self.load[r] -= 1

    def abort(self) -> None:
        """A rank died: end the whole group and this leader. The survivors are killed and the placement
        group freed first (a restarted leader needs its resources back), then Ray Data restarts the
        leader and retries its in-flight batches."""
        from ray.util.placement_group import remove_placement_group

        for rank in self.ranks:
            ray.kill(rank, no_restart=True)
        remove_placement_group(self.pg)
        os._exit(1)


def remove_groups(tag: str) -> int:
    """Remove the placement groups of the run tagged `tag` that are still there (on the driver, after the
    run); returns how many."""
    from ray.util.placement_group import get_placement_group, remove_placement_group

    names = [pg["name"] for pg in ray.util.placement_group_table().values()
             if pg.get("name", "").startswith(f"{PG_PREFIX}{tag}-") and pg["state"] != "REMOVED"]
    for name in names:
        try:
            remove_placement_group(get_placement_group(name))
        except ValueError:  # removed meanwhile (a leader's abort)
            pass
    return len(names)
