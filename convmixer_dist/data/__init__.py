"""The data sources (CIFAR files, synthetic data, class folders, TFRecord shards), their decoding and
augmentation, and the distributed input pipeline (pipeline.py)."""
