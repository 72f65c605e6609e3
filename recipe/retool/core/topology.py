"""Where a stage runs: GPUs per node, nodes, this node's rank and the rendezvous address."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from recipe.retool.core.request import LaunchError

Device = Literal["cuda", "cpu"]


@dataclass(frozen=True)
class Topology:
    """Where a stage runs. ``device="cpu"`` is the laptop smoke path (see local/cpu_compat.py)."""

    gpus_per_node: int = 8
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    device: Device = "cuda"
    gpu_type: str = "H100"

    def __post_init__(self) -> None:
        if self.gpus_per_node < 1 or self.nnodes < 1:
            raise LaunchError(
                f"{self.gpus_per_node} GPUs per node on {self.nnodes} node(s): both must be >= 1 "
                "(--gpus / RETOOL_GPUS, --nodes / RETOOL_NODES)"
            )

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nnodes

    @classmethod
    def of_cluster(
        cls, addresses: Sequence[str], rank: int, *, gpus_per_node: int, gpu_type: str
    ) -> Topology:
        """One node (``addresses`` of one or none), or node ``rank`` of a cluster whose head is
        the first address."""
        if len(addresses) <= 1:
            return cls(gpus_per_node=gpus_per_node, gpu_type=gpu_type)
        return cls(gpus_per_node=gpus_per_node, nnodes=len(addresses), node_rank=rank,
                   master_addr=addresses[0], gpu_type=gpu_type)  # fmt: skip
