"""The classic CS231n / EECS 498-007 workflow on linclass's public API: linear SVM and
softmax classifiers, the two-layer net, SGD trainers, the batched hyperparameter sweep,
data loading, plots and the ``linclass`` command line.

It uses only what ``linclass`` exports (the fused losses, ``linclass.sgd``,
``linclass.backends``), so it could live in a repository of its own.
"""
