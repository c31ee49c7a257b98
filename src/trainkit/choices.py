"""The recipes' names, listed once, below everything that offers or checks them: TrainConfig
validates settings against them and the CLI offers them without importing the recipes (their
data, models and tokenizers), which import these lists from here too."""

DATASET_NAMES = ("mnist", "fashion-mnist", "synthetic")  # trainkit.recipes.images's datasets
TTA_MODES = ("shifts",)  # trainkit.recipes.tta: test-time augmentation
SEQUENCE_MODELS = ("transformer", "lstm")  # trainkit.recipes.text.models
SEQUENCE_NORMS = ("layer", "rms", "batch", "none")
NORM_POSITIONS = ("pre", "post")
TOKENIZERS = ("char", "byte", "bpe")  # trainkit.recipes.text.tokenizers
