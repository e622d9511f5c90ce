"""``python -m iwd_fast ...`` is the ``iwd-fast`` command (also under ``torchrun -m iwd_fast``)."""
from .app.cli import main

raise SystemExit(main())
