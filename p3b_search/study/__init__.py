"""The study layer: what a study is, checked before any compute, and what it left behind.

No Ray, MLflow or Optuna here: the search (``p3b_search.search``), the tracking
(``p3b_search.tracking``) and the export (``p3b_search.export``) layers build on it.

* :mod:`.sections` -- the study file's sections, one pydantic model each (``StudyConfig``)
* :mod:`.messages` -- ``StudyError`` and pydantic errors as one line naming the field and the fix
* :mod:`.checks` -- every check across fields and sections, run by ``load_study``
* :mod:`.dimensions` -- the search dimensions: a method's knobs, active keys, grid values
* :mod:`.trials` -- a trial's configuration (``trial_config``, ``trial_budget``, ``grid_configs``)
* :mod:`.loading` -- ``load_study`` (YAML, paths), ``with_overrides``, ``study_from_folder``
* :mod:`.layout` -- the files of a study folder
* :mod:`.trials_table` -- the trials table's column and state names, which rows ran, ended, finished
* :mod:`.results` -- ``trials.parquet`` and ``allocations.parquet`` (``read_trials``)
* :mod:`.pareto` -- ``pareto_mask``, ``hypervolume``, ``knee_index``
* :mod:`.dense` -- the dense model as the reference point (``dense_cost``)
* :mod:`.front` -- the one Pareto summary (front, knee, hypervolume, dense reference)
* :mod:`.summary` -- ``StudyOutcome``, ``study_summary``, ``study_finished``
* :mod:`.tracking` -- the protocol a study tracker implements (dependency inversion)
* :mod:`.compare`, :mod:`.tables` -- method comparison and console tables (pandas)
* :mod:`.stopping` -- the early-stopping rule (``DominationRule``), shared by the live stopper and the replay
* :mod:`.rungs` -- rung ranking of multi-objective successive halving (``SuccessiveHalvingRule``)
* :mod:`.tabular` -- the tabular benchmark's table: trials with their learning curves (``read_table``)
"""
