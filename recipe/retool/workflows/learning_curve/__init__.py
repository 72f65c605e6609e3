"""Proof that DAPO learns: SFT a small model to use the tool, measure where its held-out accuracy
leaves room to learn, then DAPO it from there with several seeds and a control whose reward
carries no information. ``make dapo-curve`` on a GPU box; the Modal ``learning_curve`` function
runs the same code: ``proof.py`` (settings, requests, the run), ``stats.py`` (the band, the paired
intervals, the verdict), ``report.py``.

Every piece is the production code path: the SFT stage (``run_sft``), evaluation's
rollouts and scoring (``eval/sweep.py``: one vLLM engine, each saved SFT step's weights swapped
in), the DAPO stage (``run_dapo`` → verl ``main_ppo`` with vLLM rollouts, the tool in the
project's sandbox, the ReTool reward manager, the bounded dynamic sampler) and verl's own metrics
and validation dumps. Only sizes differ: a random-init Qwen2 of a few million parameters, synthetic
problems whose answers the code computes, and step counts that fit a short GPU lease.

1. **SFT** saves every ``sft_save_every`` steps, often enough to bracket the abrupt jump in
   accuracy (where it lands differs from run to run).
2. **Calibration** scores the saved steps in order on the held-out problems and stops at the
   first one inside the band (``curve_stats.pick_start``); none: one line, exit 3, no DAPO.
3. **Arms**, from that step with the same settings and number of updates: one per seed, and the
   control (rewards shuffled across each batch: ``dapo_sampler.shuffle_rewards``), run side by
   side on the GPU.
4. **Rise** of each arm: last validation minus first (at the start), with a paired bootstrap
   interval over the held-out problems from verl's validation dumps. The proof holds when every
   seed rises above the control and the control's interval includes 0.

Writes under ``--root``: the volume layout, ``calibration.json``, ``arms/<arm>.json`` (the
``docs/gpu-runs`` rows), ``curve.json`` (all of it), ``curve.md`` and ``curve.png``. A rerun
keeps the SFT, the calibration and finished arms.
"""
