"""The speed benchmark of pruned models (see ``bench/speed/run.py``)."""
