"""``lmedit app``: a local web page for editing, comparing methods, tracing and browsing runs.

:mod:`lmedit.app.workbench` and :mod:`lmedit.app.runs` hold what the page does
(plain functions, tested without a browser); :mod:`lmedit.app.ui` builds the
page with Gradio (the ``app`` extra). Importing this package loads neither
torch nor Gradio.
"""


class AppError(ValueError):
    """An action the page asked for cannot be done; the message says why and what to do instead."""
