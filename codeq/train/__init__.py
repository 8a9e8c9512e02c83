"""codeq.train: the registry-driven YAML trainer (``run_training.py`` /
``codeq-train``).  See docs/TRAINING.md.

Modules: ``config`` (schema, ConfigError), ``build`` (model / optimizer /
scheduler / data set registries and builders), ``data``, ``checkpoint``,
``logging``, ``trainer``, ``cli``.
"""

from codeq.train.config import Config, ConfigError, config_from_dict, config_to_dict, load_config

__all__ = ["Config", "ConfigError", "config_from_dict", "config_to_dict", "load_config"]
