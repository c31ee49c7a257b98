"""Text: tokenizers, token-id splits and window sampling, GPT-style Transformer and LSTM
language models, and sampling from them (``--dataset text``).

A recipe on top of the library, like the IDX image recipe: the loop sees a NextToken task,
EpochBatches of (ids, next ids) windows and an nn.Module; nothing in the loop knows text.
"""
