"""Experiment tracking of studies and trials (MLflow): every MLflow call of the project.

Built on the study layer only (never on ``p3b_search.search``): the runner drives it through
``p3b_search.study.tracking.StudyTracking`` (:class:`.study_tracking.MlflowStudyTracking`),
which the command line passes in.

* :mod:`.client` -- tags, batched logging, paged search, UI links
* :mod:`.study_run` -- the study's parent run and the Pareto summary published on it
* :mod:`.trial_run` -- a trial's child run (worker side) and the factory that opens it
* :mod:`.study_tracking` -- the two above as the runner's ``StudyTracking``
* :mod:`.moved_store` -- the embedded store's artifact locations after the study folder moved
* :mod:`.background` -- the worker's sending thread; :mod:`.figures` -- allocation figures
* :mod:`.registry` -- the model registry step of an export; :mod:`.ui` -- ``search.py ui``
"""
