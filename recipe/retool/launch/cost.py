"""The cost line printed before a launch: GPU-hours times the card's price."""

from __future__ import annotations

from recipe.retool.core.paths import Stage
from recipe.retool.core.topology import Topology
from recipe.retool.launch.commands import (
    load_stage_config,
)

# Price used for the cost line printed before launch. Source: a third-party listing of Modal's
# H100 price, May 2026 (about $3.95 per GPU-hour). Check modal.com/pricing before budgeting.
GPU_PRICE_PER_HOUR = {"H100": 3.95}


def estimate_cost(stage: Stage, topo: Topology) -> str:
    """One line: GPU-hours × price, from the stage's ``estimate_hours`` (scaled by GPU count)."""
    hours = load_stage_config(stage).estimate_hours * 8 / max(topo.world_size, 1)
    gpu_hours = hours * topo.world_size
    line = f"{stage}: ~{hours:.1f} h on {topo.world_size}×{topo.gpu_type} = {gpu_hours:.0f} GPU-h"
    price = GPU_PRICE_PER_HOUR.get(topo.gpu_type)
    if price is None:
        return f"{line} (no price on file for {topo.gpu_type})"
    return f"{line} ≈ ${gpu_hours * price:,.0f} at ${price}/GPU-h (third-party listing, May 2026)"
