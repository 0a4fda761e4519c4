"""ipywidgets apps for JupyterLab: model picker, run panel, transcript viewer, batch browser.

Each piece works alone, and ``app()`` shows them together in one cell. A batch runs as an
asyncio task on the kernel's event loop, so the kernel keeps running cells while it runs and
Cancel takes effect between requests. Outside a running loop (a plain script or a test)
the batch runs on its own loop in a worker thread instead. Model output is untrusted:
every piece of it is escaped before it reaches an HTML widget.
"""

from hermitkit.widgets.application import HermitApp, app
from hermitkit.widgets.base import default_endpoint
from hermitkit.widgets.browser import BatchBrowser
from hermitkit.widgets.picker import ModelPicker
from hermitkit.widgets.render import transcript_html
from hermitkit.widgets.run_panel import RunPanel
from hermitkit.widgets.transcript import TranscriptViewer

__all__ = ["BatchBrowser", "HermitApp", "ModelPicker", "RunPanel", "TranscriptViewer", "app", "default_endpoint", "transcript_html"]
