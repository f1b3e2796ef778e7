"""The files a run writes and reads, one module per format.

* :mod:`.checkpoint`: training checkpoints (state, and their compatibility with a
  run to resume or a target to evaluate);
* :mod:`.reference_features`: the reference features of the unseen classes
  (write, read, check);
* :mod:`.run_outputs`: every result file name of a run, the metrics tables and
  their ``Mean`` row;
* :mod:`.predictions`: the files of ``predict.py`` (``scores.csv``, heat-maps, raw maps).
"""
