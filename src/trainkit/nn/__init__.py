"""Network building blocks: layers (activations, norms, dropout, residual), the recipes' model
builders, weight initialisation on ``torch.nn.init``, and per-layer signal diagnostics."""
