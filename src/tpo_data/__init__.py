"""tpo-data: Thought Preference Optimization and implicit self-improvement data and training."""

import warnings

from tpo_data.distilabel_hooks import import_distilabel
from tpo_data.errors import TPODataError

# distilabel 1.5's model classes trip this pydantic 2.12 warning on import, in every process
# (each spawned pipeline worker too), flooding the logs; it changes nothing at run time.
warnings.filterwarnings(
    "ignore", message=r"The 'default' attribute with value None was provided to the `Field\(\)`"
)
import_distilabel()  # before any module of ours imports it: no show_locals tracebacks

__all__ = ["TPODataError"]
__version__ = "0.1.0"
