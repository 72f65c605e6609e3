"""CPU-only helpers for the local smoke run: verl shim, CPU rollouts, tiny model, samples."""
