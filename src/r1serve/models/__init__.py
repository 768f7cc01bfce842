"""The model catalog (catalog.py) and getting weights onto the disk (fetch.py)."""
