"""Importing this module installs the trainer plugins (:func:`trainer_setup.install`) in the
importing process; ``config/dapo.yaml`` names it as verl's ``actor_rollout_ref.model.external_lib``.

verl imports that module when a worker builds its model config, inside the Ray actor, after Ray
has set the actor's ``CUDA_VISIBLE_DEVICES``. A Ray ``worker_process_setup_hook`` runs earlier, at
worker start: importing verl there (``verl.utils.device`` calls ``torch.cuda.is_available()``)
initialises CUDA while every GPU of the node is visible, so every actor then trains on the node's
first GPU. On 2 H200s main_ppo failed at its first NCCL call: "Duplicate GPU detected".
"""

from recipe.retool.verl_plugins.trainer_setup import install

install()
