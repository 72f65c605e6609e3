"""The pipeline's stages as plain functions: what Modal, docker compose and the CPU smoke all run.

Each stage takes a :class:`~recipe.retool.core.paths.Layout` (where things live), a
:class:`~recipe.retool.core.topology.Topology` (where it runs) and a
:class:`~recipe.retool.core.request.LaunchRequest` (what the user asked for, parsed at the edge),
so the Modal app is a thin shell and the same code is tested on temporary directories. Training
stays a subprocess (torchrun / main_ppo) so verl's own entry points run unmodified.
"""
