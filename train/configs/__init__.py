"""Named run configurations: each module defines get_config() -> train.config.Config."""
