"""The search layer: study files, the search space, the Ray Tune runner, the Pareto front and
the Parquet results.

Modules (import what you need; only :mod:`.runner`, :mod:`.searcher`, :mod:`.trainable` and
:mod:`.early_stopping` import Ray):

* :mod:`.schema` -- the study file (``load_study``, ``trial_config``, ``StudyError``), the grid
* :mod:`.space` -- Optuna distributions, define-by-run sampling, the reference trial
* :mod:`.samplers` -- the Optuna samplers by name (a registry) and a user's ``module:Class``
* :mod:`.compare` -- the method comparison table (``search.py compare``)
* :mod:`.pareto` -- ``pareto_mask``, ``hypervolume``, ``knee_index``
* :mod:`.results` -- ``trials.parquet`` and ``allocations.parquet``
* :mod:`.layout` -- the files of a study folder
* :mod:`.runner` -- ``run_study`` (driver), :mod:`.searcher` -- Optuna behind Ray Tune,
  :mod:`.trainable` -- what runs in a Ray worker, :mod:`.early_stopping` -- hopeless trials
"""
