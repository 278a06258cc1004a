"""The training-cost advisor: time per epoch, accuracy per epoch, and the
cheapest configuration to reach a target accuracy. See docs/advisor.md."""

from .advisor import Advisor
from .errors import AdvisorInputError
from .loading import default_data_path, load_epochs
from .recommend import Recommendation

__all__ = ["Advisor", "AdvisorInputError", "Recommendation", "default_data_path", "load_epochs"]
