"""The search layer: Optuna and Ray only, on top of the study layer (``p3b_search.study``).

Modules (import what you need):

* :mod:`.preflight` -- machine-side checks before a study starts (paths, resources, cluster)
* :mod:`.runner` -- ``run_study``: Ray start-up, the Tuner, resume (the driver)
* :mod:`.progress` -- the driver's live session and the Ray Tune callback (tables, front, console)
* :mod:`.searcher` -- Optuna behind Ray Tune; :mod:`.space` -- distributions, define-by-run
  sampling, the reference trial; :mod:`.samplers` -- the Optuna samplers by name (a registry)
  and a user's ``module:Class``
* :mod:`.trainable` -- what runs in a Ray worker; :mod:`.early_stopping` -- hopeless trials;
  :mod:`.successive_halving` -- the multi-objective successive-halving scheduler
* :mod:`.replay` -- the tabular benchmark's replay simulator: samplers and schedulers over a table

It never imports ``p3b_search.tracking``: a tracker reaches the runner as a
``p3b_search.study.tracking.StudyTracking`` (see ``p3b_search.launch``).
"""
