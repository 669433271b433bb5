"""One module per DVC stage: what the stage computes and where its outs land.

Stage scripts in ``stages/`` only parse arguments and call these through
:func:`dtm_core.cli.main`. Every function takes the parsed params and a
:class:`~dtm_core.tracking.StageRun` (or :class:`~dtm_core.steps.common.NullRun`)
to log to, writes its outs atomically, and returns the metrics that land in
the stage's DVC-tracked metrics JSON.

A stage script imports only its own module here, so each stage in
``dvc.yaml`` depends on exactly the library files it runs
(``tests/test_dvc_deps.py`` checks the lists against the imports).
"""
