"""hyportrait: a deployment runtime for HunyuanPortrait."""
__version__ = "0.1.0"
