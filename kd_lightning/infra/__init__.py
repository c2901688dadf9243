"""What keeps runs safe, one home each, used by every layer above: atomic writes (`atomic`), the
run directory and its lock (`rundir`), the run record (`runrecord`), safe loading (`safeload`),
signals (`signals`), distributed helpers (`distributed`), FSDP sharding (`sharding`) and the model
cache (`model_cache`). Nothing here imports the rest of kd_lightning."""
