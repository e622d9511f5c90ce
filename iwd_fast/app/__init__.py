"""The application: the ``iwd-fast`` command, the demo, dataset scoring and distillation jobs, presets,
run folders, plots and the environment report. ``distill_data`` (iwd_fast.app.distill_api) distils data one
already has from Python; it is imported on first use, so the command line starts without it."""

__all__ = ["distill_data", "DistilledSet"]


def __getattr__(name):
    if name in __all__:
        from . import distill_api

        return getattr(distill_api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
