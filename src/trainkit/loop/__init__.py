"""The training loop: the Trainer (fit → epoch → optimizer step → micro-batch, evaluate, predict)
and the small objects it composes — the NaN policies, weight averaging, the lr over time, the
out-of-memory back-off, and the checkpoint payload."""
