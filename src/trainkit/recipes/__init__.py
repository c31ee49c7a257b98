"""The recipes on top of the library: the ``train`` job (``run``: data, model, init, Trainer,
test, summary; with ``resume``, ``outputs`` and ``from_checkpoint``), its datasets (``images``,
``text``), what it trains (``components``, the user's ``factories``) and test-time augmentation
(``tta``). The library never imports them."""
