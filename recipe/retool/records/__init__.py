"""What a run leaves behind and how to follow it: wandb settings and links, the metrics verl
logs, the run reports, the result files (standard library at import: the launch client imports
``follow`` and ``tracking``)."""
