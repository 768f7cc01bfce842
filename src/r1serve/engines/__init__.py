"""Engines: a request in, an async stream of deltas out. See base.py for the interface."""
