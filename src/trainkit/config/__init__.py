"""Run configuration as explicit data: ``TrainConfig`` and its checks (``schema``), the lists of
choices and limits (``names``), single-value checks (``values``), and settings read from files
and dicts (``files``)."""

from trainkit.config.files import config_from_dict, load_config_file, recipe_config
from trainkit.config.names import OPTIMIZERS, PRECISIONS, SCHEDULES, flag_name
from trainkit.config.schema import LOOP_FIELDS, TrainConfig

__all__ = [
    "LOOP_FIELDS", "OPTIMIZERS", "PRECISIONS", "SCHEDULES", "TrainConfig", "config_from_dict", "flag_name",
    "load_config_file", "recipe_config",
]  # fmt: skip
