"""The maestro_jax training runner: ``train_and_evaluate(config, workdir)`` and its CLI."""
