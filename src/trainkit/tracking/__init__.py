"""What a run records and how it is shown: the epoch's running sums and ``history.csv``
(``history``), TensorBoard/MLflow (``loggers``), the runs under a folder (``runs``), the HTML
report (``report``) and plots (``plots``)."""
