"""tpo-data: Thought Preference Optimization and implicit self-improvement data and training."""

from tpo_data.errors import TPODataError

__all__ = ["TPODataError"]
__version__ = "0.1.0"
