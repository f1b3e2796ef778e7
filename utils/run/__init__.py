"""The runs: training (:mod:`.train_run`), evaluating a checkpoint (:mod:`.eval_run`) and the
training-free kNN baseline (:mod:`.knn`), which share the checks-first preparation of
:mod:`.preflight` and the evaluation loop of :mod:`.evaluation`; configuration in :mod:`.config`."""
