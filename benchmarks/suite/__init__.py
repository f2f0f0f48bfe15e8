"""A suite of small training tasks on which to compare batch-size policies side by side.

``python3 -m benchmarks.suite --help``; the method is in ``benchmarks/README.md``.
"""

from . import gpt, mnist1d, regression
from .task import Task

#: Every task, by name, in the order the suite runs them.
TASKS: dict[str, Task] = {task.name: task for task in (*mnist1d.TASKS, gpt.TASK, regression.TASK)}

__all__ = ["TASKS", "Task"]
