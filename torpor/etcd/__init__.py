"""etcd v3 for fleet mode: one connection and one lease per process, and what is built on
them (the store's records and watches, the wake lock, leader election, the registry of
activator replicas).

aetcd supplies the generated etcd protos and stubs; its higher-level helpers are not used
(measured: its lock leaks a lease per failed attempt and never refreshes it).
"""
