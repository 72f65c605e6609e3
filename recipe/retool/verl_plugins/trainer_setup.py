"""What every process that trains with verl installs first: the project's kernels for hot paths.

- :mod:`fast_logprobs`: token log-probs in fused chunks instead of verl's per-token loop;
- :mod:`varlen_attention`: torch's varlen flash attention for packed (remove-padding) micro-batches
  and Ulysses sequence parallelism, registered with transformers under
  ``varlen_attention.NAME``, the implementation ``launch/commands.py`` asks verl to load.

Both only replace verl/transformers functions in the running process, so they are installed where
the models are built:
- SFT: ``torchrun -m recipe.retool.verl_plugins.trainer_setup <overrides>`` runs verl's SFT trainer
  after :func:`install` (``launch.sft_command``; the CPU shim runs it too);
- DAPO: every worker that builds a model, through verl's ``actor_rollout_ref.model.external_lib``
  (``config/dapo.yaml`` names :mod:`install_on_import`).
"""

from __future__ import annotations

import sys
from types import ModuleType

from recipe.retool.verl_plugins import fast_logprobs, varlen_attention


def install() -> None:
    """Install every plugin in this process (idempotent)."""
    fast_logprobs.install()
    varlen_attention.install()


def run_verl(entry: ModuleType) -> None:
    """Run a verl entry module's Hydra ``main`` from a wrapper module, as ``python -m <entry>``
    would: ``sys.argv[0]`` names the entry's file, not the wrapper's (Hydra reads the script it
    runs from it). The overrides stay in ``sys.argv[1:]``."""
    sys.argv[0] = entry.__file__
    entry.main()


def main() -> None:
    """``torchrun -m recipe.retool.verl_plugins.trainer_setup <overrides>``: verl's SFT trainer."""
    install()
    from verl.trainer import sft_trainer

    run_verl(sft_trainer)


if __name__ == "__main__":
    main()
