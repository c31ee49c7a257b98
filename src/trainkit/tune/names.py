"""The tuner's choices, named once: the CLI offers them and the study builds them."""

SAMPLERS = ("tpe", "random", "grid")  # Optuna's TPESampler, RandomSampler, GridSampler
PRUNERS = ("median", "hyperband", "none")  # MedianPruner, HyperbandPruner, NopPruner
