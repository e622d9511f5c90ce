"""The application: the ``iwd-fast`` command, the demo, dataset scoring and distillation jobs, presets,
run folders, plots and the environment report."""
