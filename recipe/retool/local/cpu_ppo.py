"""verl's ``main_ppo`` on CPU: the real DAPO trainer loop for ``make local-smoke`` and CI.

``python -m recipe.retool.local.cpu_ppo <hydra overrides>`` installs the CPU shims of
``cpu_compat`` and the CPU rollout backend (``rollout_replica_cpu``) in this process, then hands
over to verl's own ``main_ppo``. verl then runs on Ray as on GPUs: the V1 trainer, TransferQueue,
the agent loop with our tool and the sandbox, the reward manager, dynamic sampling, GRPO, FSDP2
actor updates, weight sync into the rollout, checkpoints. Every Ray worker gets the same shims
through ``worker_process_setup_hook`` (:func:`install_worker`, which :data:`CPU_PPO_OVERRIDES`
sets in place of the GPU hook in ``config/dapo.yaml``).

The run differs from production only by the overrides below (device, kernels, worker counts,
rollout backend); sizes are the caller's.
"""

from __future__ import annotations

from recipe.retool.local import cpu_compat
from recipe.retool.verl_plugins import trainer_setup

CPU_PPO_OVERRIDES: tuple[str, ...] = (
    "trainer.device=cpu",
    "actor_rollout_ref.rollout.name=hf_cpu",  # rollout_replica_cpu.NAME
    "actor_rollout_ref.rollout.calculate_log_probs=true",  # verl compares rollout and actor
    "actor_rollout_ref.actor.strategy=fsdp2",  # FSDP1 calls into a CUDA device
    "actor_rollout_ref.actor.fsdp_config.dtype=float32",
    "actor_rollout_ref.actor.fsdp_config.param_offload=false",
    "actor_rollout_ref.actor.fsdp_config.optimizer_offload=false",
    "actor_rollout_ref.model.use_remove_padding=false",  # packing pays off with GPU kernels only
    "++actor_rollout_ref.model.override_config.attn_implementation=sdpa",
    "actor_rollout_ref.actor.ulysses_sequence_parallel_size=1",  # needs remove-padding
    "actor_rollout_ref.model.enable_gradient_checkpointing=false",
    "actor_rollout_ref.actor.use_dynamic_bsz=false",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
    # One process per role: every Ray worker imports torch and verl, seconds each on 2 cores.
    "actor_rollout_ref.rollout.agent.num_workers=1",
    "reward.num_workers=1",
    "data.dataloader_num_workers=0",
    "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
    "++ray_kwargs.ray_init.runtime_env.worker_process_setup_hook="
    "recipe.retool.local.cpu_ppo.install_worker",
)
# Logical CPUs for the Ray that main_ppo starts on one machine: the trainer, agent-loop, reward
# and TransferQueue actors each reserve one while being scheduled, however few cores there are.
RAY_CPUS = 16


def cpu_ppo_overrides(ranks_per_node: int, nnodes: int) -> list[str]:
    """:data:`CPU_PPO_OVERRIDES`, plus on one node the Ray resources main_ppo's own ``ray.init``
    declares: a logical "GPU" per training rank (see ``cpu_compat``) and :data:`RAY_CPUS`. A
    multi-node run joins a cluster whose nodes declared theirs (``launch.ray_node_command``)."""
    if nnodes > 1:
        return list(CPU_PPO_OVERRIDES)
    ray_init = [
        f"++ray_kwargs.ray_init.num_gpus={ranks_per_node}",
        f"ray_kwargs.ray_init.num_cpus={RAY_CPUS}",
    ]
    return [*CPU_PPO_OVERRIDES, *ray_init]


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
