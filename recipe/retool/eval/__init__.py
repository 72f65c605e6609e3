"""Evaluation on AIME with the training tool loop (``python -m recipe.retool.eval``).

``config`` settings, ``checkpoints`` what is evaluated and where its reports go, ``problems``
the data, ``agent_loop`` one rollout through verl's ToolAgentLoop, ``backends`` the generation
engines, ``runner`` one evaluation end to end, ``metrics``, ``report``, ``sweep`` many steps of
one model with one engine, ``__main__`` the command line.
"""
