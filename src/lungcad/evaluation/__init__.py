"""Evaluation: metrics, (later) confidence intervals, calibration and reports."""
