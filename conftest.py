"""Root conftest: a pytest run from the repository root uses the ``smoke`` profile unless told otherwise.

Without ``KDLIB_PROFILE`` a chapter runs the ``book`` profile (the reader's default, see
``kdlib.config.active_profile``). Under pytest it must not: ``pytest --nbval-lax notebooks/`` from the
root would otherwise train the book's runs. pytest reads this file before it starts any kernel, and the
kernels inherit the environment. ``tests/conftest.py`` sets the same default for the unit tests.
"""

import os

os.environ.setdefault("KDLIB_PROFILE", "smoke")
