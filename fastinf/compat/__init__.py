"""Drop-in engines with the reference repositories' surface: ``fastinf.compat.datainf`` and
``fastinf.compat.rrinf`` (``IFEngine``, ``IFEngineGeneration``)."""
