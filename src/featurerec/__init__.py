"""featurerec: recommend the right product feature to the right user at the right moment."""

import os as _os

# implicit's ALS and faiss run their own parallel loops; a second BLAS thread pool underneath
# oversubscribes the cores (implicit warns about it). Respect a value the user set.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
