"""verl's ``main_ppo`` on CPU: the real DAPO trainer loop for ``make local-smoke`` and CI.

``python -m recipe.retool.local.cpu_ppo <hydra overrides>`` installs the CPU shims of
``cpu_compat`` and the CPU rollout backend (``rollout_replica_cpu``) in this process, then hands
over to verl's own ``main_ppo``. verl then runs on Ray as on GPUs: the V1 trainer, TransferQueue,
the agent loop with our tool and the sandbox, the reward manager, dynamic sampling, GRPO, FSDP2
actor updates, weight sync into the rollout, checkpoints. Every Ray worker gets the same shims
through ``worker_process_setup_hook`` (:func:`install_worker`, which ``config/dapo_cpu.yaml``
sets in place of the GPU hook in ``config/dapo.yaml``).

The run differs from production only by the overrides of ``config/dapo_cpu.yaml`` (device,
kernels, worker counts, rollout backend); sizes are the caller's.
"""

from __future__ import annotations

from recipe.retool.local import cpu_compat
from recipe.retool.verl_plugins import trainer_setup


def install_worker() -> None:
    """The CPU shims and the ``hf_cpu`` rollout, in this process (a Ray worker or the driver)."""
    from recipe.retool.local import rollout_replica_cpu

    cpu_compat.install(hide_gpus=False)
    rollout_replica_cpu.register()


def main() -> None:
    """``python -m recipe.retool.local.cpu_ppo <overrides>``: verl's main_ppo, on CPU."""
    install_worker()
    from verl.trainer import main_ppo

    trainer_setup.run_verl(main_ppo)


if __name__ == "__main__":
    main()
