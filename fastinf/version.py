"""The fastinf version, in one place (``fastinf.__version__``, store manifests, reports, ``--version``)."""

__version__ = "0.1.0"
