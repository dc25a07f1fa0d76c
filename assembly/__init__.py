"""The top layer: the command line and the assembly of components into processes.

Only this package imports both `xds_server` and `activator`; `torpor/` (the shared core),
`policies/`, `xds_server/` and `activator/` sit below it and never import it.
"""
