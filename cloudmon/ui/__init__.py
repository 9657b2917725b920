"""The desktop console (PySide6 + pyqtgraph): the only package that imports Qt.

Entry point: :func:`cloudmon.ui.app.run_console`.  The console is a client of
the collector's HTTP API (:mod:`cloudmon.client`); every API call runs in a
worker thread (:mod:`cloudmon.ui.workers`) and results reach widgets only
through queued Qt signals, so the window never waits on the network.

Modules:

* ``app``        QApplication, logging of the first draw, screenshots, runner
* ``window``     main window: tabs, toolbar, status bar, wiring of workers
* ``overview``   the node table (model, proxy, page, empty state)
* ``nodepage``   one node's header, live/historical charts, filesystems
* ``add_node``   the "Add node…" dialog
* ``workers``    request and stream worker threads
* ``ringbuffer`` fixed-size numpy buffers behind the live charts (Qt-free)
* ``format``     human units and colour scales (Qt-free)
"""
