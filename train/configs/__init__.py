"""Named run configurations: each module defines get_config() -> maestro_train.config.Config."""
