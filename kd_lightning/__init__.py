"""kd-lightning."""
