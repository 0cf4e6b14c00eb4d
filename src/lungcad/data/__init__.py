"""Data: discovery of labelled images, grouping into patient proxies, splits, preprocessing."""
