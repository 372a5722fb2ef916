"""The comparison lab: several methods on the same model, data, budget and seeds, side by side.

``run_comparison`` trains each (method, seed) in a process of its own (``peftkit.lab.worker``), then writes
one table (Markdown, CSV, JSON) and PNG charts. A method is any name declared with ``declare_method``
(:mod:`peftkit.method_spec`); a new method needs nothing here.
"""

from peftkit.lab.comparison import Comparison, run_comparison
from peftkit.lab.defaults import DEFAULT_METHODS, METHOD_DEFAULTS, default_method_settings
from peftkit.lab.records import RunRecord
from peftkit.lab.summary import MethodSummary

__all__ = [
    "DEFAULT_METHODS",
    "METHOD_DEFAULTS",
    "Comparison",
    "MethodSummary",
    "RunRecord",
    "default_method_settings",
    "run_comparison",
]
