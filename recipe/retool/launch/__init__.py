"""Turning a launch request into verl's command line, checked against verl's own config before
any GPU starts: ``commands`` (override lists and commands), ``validation`` (composition against
verl's Hydra config), ``async_plan`` (the fully-async DAPO mode), ``cost`` (the cost line) and
``check`` (the ``check`` CLI: ``python -m recipe.retool.launch check``). Knows verl and Hydra,
nothing about Modal."""
