"""Evaluation on the host, shared by the tasks: the `Evaluator` interface and the summing one
(`base.py`), segmentation's confusion-matrix metrics (`segmentation.py`), COCO's box and mask
metrics and results files (`coco.py`)."""
