"""Example workloads that torpor can put to sleep and wake: see `model_server`.

Owns nothing torpor itself depends on; torpor must not import from here.
"""
