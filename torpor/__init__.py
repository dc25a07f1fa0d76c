"""torpor: puts idle model services to sleep and wakes them on the first request.

This package holds what every component shares: the service model, config, store,
workloads, metrics, logging and the command line. Components (xds_server, activator,
policies) import from here; this package never imports from them, except the CLI
which wires them together.
"""

__version__ = "0.1.0"
