"""codeq.train: the registry-driven YAML trainer (``run_training.py`` /
``codeq-train``).  See docs/TRAINING.md.

Modules, each using only those before it: ``sampling`` (the data order),
``device_data``, ``data`` (data sets and loaders), ``optim`` (optimizer,
scheduler, parameter groups), ``config`` (the schema), ``logging``,
``distributed``, ``graph``, ``malloc``, ``values`` (values read by name),
``budget`` (the controller and the handles it writes through), ``terms`` (the
loss terms as objects), ``trainer``, ``cli``.  Importing the
package registers its data sets, optimizers and schedulers in
:mod:`codeq.registry`.
"""

from codeq.train import data, optim  # noqa: F401  (their registry entries)
from codeq.train.config import Config, ConfigError, config_from_dict, config_to_dict, load_config

__all__ = ["Config", "ConfigError", "config_from_dict", "config_to_dict", "load_config"]
