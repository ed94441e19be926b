"""The features plug-in: float vectors a frozen backbone computed from another dataset version
(`pipelines/featurize.py`), and the heads that train on them."""
