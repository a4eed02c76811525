"""Training engine: state, one training step, the epoch loop, EMA, schedules, checkpoints."""
