"""Reproducible measurements of wsi-espnet: ``python -m benchmarks.run`` (results in README.md).

Every figure is either a ratio measured inside one invocation (so a noisy, shared machine slows
both sides alike) or a median of repeats after a warm-up.
"""
