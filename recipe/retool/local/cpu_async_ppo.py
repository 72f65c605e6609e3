"""verl's fully-async DAPO trainer on CPU: ``--rollout-mode=async`` for the smoke and CI.

``python -m recipe.retool.local.cpu_async_ppo <hydra overrides>`` installs what ``cpu_ppo`` does
(the CPU platform, the ``hf_cpu`` rollout replica, gloo) and hands over to verl's own
``fully_async_main``: a rollouter actor streams prompts one at a time through the ``hf_cpu``
replica and the tool agent loop into verl's message queue, a trainer actor takes them from there,
and weights travel from trainer to rollout after every sync interval, as on GPUs.

Two GPU mechanisms have CPU counterparts or are switched off (``config/dapo_async_cpu.yaml``):

* weight sync: verl's NCCL checkpoint engine broadcasts from actor rank 0 to the rollout GPUs;
  here :mod:`checkpoint_engine_cpu` moves the same tensors through Ray's object store;
* partial rollouts: verl aborts vLLM's in-flight requests at a sync and resumes them under the
  new weights. The ``hf_cpu`` server cannot stop a ``generate`` call midway, so partial rollouts
  are off: a sync waits for the request in flight (the server's lock), and every trajectory is
  sampled under one weight version.
"""

from __future__ import annotations

import runpy

from recipe.retool.local.cpu_ppo import install_worker


def main() -> None:
    """``python -m recipe.retool.local.cpu_async_ppo <overrides>``: fully-async DAPO on CPU."""
    from recipe.retool.launch.async_plan import load_async_config

    install_worker()
    # As `python -m`: Hydra finds this entry's config/ (a folder, not a package) next to the file
    # only when its main() is defined in __main__ (trainer_setup.run_verl calls it from outside).
    runpy.run_module(load_async_config().entry_module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
