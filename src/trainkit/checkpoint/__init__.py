"""Checkpoints that survive crashes: atomic, self-verifying, safely loaded.

- ``file``: one checkpoint file (torch.save bytes and a sha256 trailer), written atomically and
  loaded with ``weights_only=True``;
- ``sharded``: ``--strategy fsdp``'s folders of shards (torch.distributed.checkpoint) with a
  sha256 manifest, built on ``file``;
- ``store``: a run's checkpoints (``CheckpointDir``), and loading or verifying either kind.
"""

from trainkit.checkpoint.file import (
    PAYLOAD_SCHEMA, TRAILER_MAGIC, TRAILER_SIZE, all_finite, encode, load_file, model_sha256, payload_problem, read_checkpoint_bytes, require_checkpoint_file, save_checkpoint, state_dict_mismatch, verified_body,
)  # fmt: skip
from trainkit.checkpoint.store import (
    BEST_FILE, CHECKPOINT_NAME, SET_ASIDE_SUFFIX, SHARDED_BEST, CheckpointDir, CheckpointName, check_integrity, damage_of, load_checkpoint, remove_checkpoint, verify_checkpoint,
)  # fmt: skip

__all__ = [
    "PAYLOAD_SCHEMA", "TRAILER_MAGIC", "TRAILER_SIZE", "all_finite", "encode", "load_file", "model_sha256",
    "payload_problem", "read_checkpoint_bytes", "require_checkpoint_file", "save_checkpoint", "state_dict_mismatch",
    "verified_body", "BEST_FILE", "CHECKPOINT_NAME", "SET_ASIDE_SUFFIX", "SHARDED_BEST", "CheckpointDir",
    "CheckpointName", "check_integrity", "damage_of", "load_checkpoint", "remove_checkpoint", "verify_checkpoint",
]  # fmt: skip
