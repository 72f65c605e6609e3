"""CPU-only shim so verl's real trainers run on a laptop. Nothing here is used on GPUs.

verl 0.9.1 knows accelerators only (nvidia, amd, huawei, ...). To run its unmodified
``verl.trainer.sft_trainer`` on CPU (for ``make local-smoke`` and CI) we

1. register a ``cpu`` platform with verl's ``PlatformRegistry`` (gloo collectives, "cpu" device,
   a ``torch.cpu``-backed device module with the memory/RNG calls verl makes), selected through
   ``VERL_PLATFORM=cpu``;
2. make the FSDP engine selectable: verl registers it for ``(cuda, nvidia)`` only, so
   ``VERL_ENGINE_DEVICE=cuda VERL_ENGINE_VENDOR=nvidia`` pick it while tensors stay on CPU.

The launcher adds the matching Hydra overrides (``config/sft_cpu.yaml``). Run as
``torchrun ... -m recipe.retool.local.cpu_compat <hydra overrides>``: this module installs the
shim and then hands over to verl's own ``sft_trainer.main``.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch

from recipe.retool.verl_plugins import trainer_setup

CPU_ENV: dict[str, str] = {
    "VERL_PLATFORM": "cpu",
    "VERL_ENGINE_DEVICE": "cuda",
    "VERL_ENGINE_VENDOR": "nvidia",
}


class _CpuDeviceModule(ModuleType):
    """What verl calls on ``get_torch_device()``, answered for the CPU."""

    def __init__(self) -> None:
        super().__init__("retool_cpu_device")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cpu, name)

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def set_device(_device: Any) -> None:
        return None

    @staticmethod
    def get_device_name(_device: Any = None) -> str:
        return "cpu"

    @staticmethod
    def synchronize(_device: Any = None) -> None:
        return None

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def memory_allocated(_device: Any = None) -> int:
        return 0

    max_memory_allocated = memory_allocated
    memory_reserved = memory_allocated
    max_memory_reserved = memory_allocated

    @staticmethod
    def reset_peak_memory_stats(_device: Any = None) -> None:
        return None

    @staticmethod
    def mem_get_info(_device: Any = None) -> tuple[int, int]:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return free, pages

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed

    @staticmethod
    def get_rng_state(_device: Any = None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, _device: Any = None) -> None:
        torch.set_rng_state(state)


def register_cpu_platform() -> None:
    """Register the ``cpu`` platform with verl (idempotent)."""
    from verl.plugin.platform.platform_base import PlatformBase
    from verl.plugin.platform.platform_manager import PlatformRegistry

    if "cpu" in PlatformRegistry.registered_names():
        return

    @PlatformRegistry.register(platform="cpu")
    class PlatformCPU(PlatformBase):
        device_name = "cpu"
        vendor_name = "cpu"
        device_module = _CpuDeviceModule()

        def is_available(self) -> bool:
            return True

        def current_device(self) -> str:  # type: ignore[override]
            return "cpu"

        def device_count(self) -> int:
            return 1

        def set_device(self, device_index: int) -> None:
            return None

        def synchronize(self, device_index: int | None = None) -> None:
            return None

        def manual_seed(self, seed: int) -> None:
            torch.manual_seed(seed)

        def manual_seed_all(self, seed: int) -> None:
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings: str) -> None:
            return None

        def empty_cache(self) -> None:
            return None

        def get_device_capability(self, device_index: int = 0) -> tuple[None, None]:
            return None, None

        def communication_backend_name(self) -> str:
            return "gloo"

        def visible_devices_envvar(self) -> str:
            return "CUDA_VISIBLE_DEVICES"

        @contextmanager
        def nvtx_range(self, msg: str):
            yield

        def profiler_start(self) -> None:
            return None

        def profiler_stop(self) -> None:
            return None

        def ray_resource_name(self) -> str:
            # verl places one training rank per unit of Ray's "GPU" resource and counts only
            # GPU/NPU when checking a pool fits (RayResourcePool._check_resource_available), so
            # the CPU run declares logical GPUs: ray.init(num_gpus=...) / ray start --num-gpus.
            return "GPU"

        def ray_noset_envvars(self) -> list[str]:
            return []

        def is_ipc_supported(self) -> bool:
            return False

        def cudart(self) -> None:
            return None


def _init_gloo_process_group(timeout_second: int = 36000) -> tuple[int, int, int]:
    """verl builds ``cpu:gloo,<device>:<backend>``, which torch rejects when both are cpu."""
    from datetime import timedelta

    torch.distributed.init_process_group(backend="gloo", timeout=timedelta(seconds=timeout_second))
    return int(os.environ["LOCAL_RANK"]), int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def install(*, hide_gpus: bool = True) -> None:
    """Set the CPU environment and register the platform before verl picks one.

    ``hide_gpus=False`` for Ray runs: Ray refuses to declare the logical GPUs verl schedules on
    (see ``ray_resource_name``) while ``CUDA_VISIBLE_DEVICES`` is empty."""
    for key, value in CPU_ENV.items():
        os.environ.setdefault(key, value)
    if hide_gpus:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    register_cpu_platform()
    trainer_setup.install()
    from verl.utils import distributed

    distributed.initialize_global_process_group = _init_gloo_process_group
    # Ray workers (main_ppo) call the Ray variant, imported by name into engine_workers; its
    # default backend string has the same cpu/cpu clash, so its default becomes plain gloo.
    distributed.initialize_global_process_group_ray.__defaults__ = (None, "gloo")


def main() -> None:
    """``torchrun -m recipe.retool.local.cpu_compat <overrides>``: verl's SFT trainer, on CPU
    (the GPU launcher's run, after the CPU shims)."""
    install()
    trainer_setup.main()


if __name__ == "__main__":
    main()
