"""Cluster-scale lensing science: simulated fields, arc segments, features, the XGBoost track and PU learning."""
