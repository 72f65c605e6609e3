"""``make dapo-curve``: the proof that DAPO learns (``python -m
recipe.retool.workflows.learning_curve``). ``proof.py`` (the run, its steps and what it writes),
``settings.py`` (the small model, the data, the arms and their SFT and DAPO requests),
``start.py`` (the kept start), ``report.py`` (``curve.md``, ``curve.png``, wandb), ``stats.py``
(the band, the paired intervals, the criterion)."""
