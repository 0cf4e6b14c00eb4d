"""Evaluation: metrics with group-bootstrap intervals, calibration and operating point, baselines, report."""
