"""Training: data -> frozen-prefix features -> the step loop -> run folders; grid search on validation; evaluation of
run folders. Entry points: :func:`taft.train.loop.train`, :func:`taft.train.search.search`,
:func:`taft.train.evaluate.evaluate_run` (re-exported as ``taft.train_run``, ``taft.search``, ``taft.evaluate_run``)."""
