"""The streaming page behind --mode=serve: a Starlette app, one generation worker thread, and its
static page (static/). Library code: hybrid_video/modes/serve.py builds and runs it.

  conditioning.py  what the page's prompt box or digit picker means to the model
  validation.py    limits and the parsing of every client message
  viewer.py        per-viewer mailboxes (frames dropped for slow viewers) and frame encoding
  worker.py        the generation worker: owns the accelerator, runs one job at a time
  app.py           the Starlette app: the page, its assets and the WebSocket
"""
