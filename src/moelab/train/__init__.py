"""Training: `moelab train` (trainer), optimizer and schedules, telemetry, checkpoints, evaluation."""
