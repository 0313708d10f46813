"""featurerec: recommend the right product feature to the right user at the right moment."""

__version__ = "0.1.0"
