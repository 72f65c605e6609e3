"""What chains the stages: the launch's checks before any GPU starts, the pipeline, evaluation on
the volumes, the learning curve."""
