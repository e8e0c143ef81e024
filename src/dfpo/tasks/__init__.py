"""Tasks: prompts, strict answer extraction, verifiers and noisy supervision.

``dfpo.tasks.get(name, **options)`` builds a registered task; ``dfpo.tasks.names()`` lists them.
"""

from dfpo.tasks import arithmetic, dialogue, known_value, mathtask, science, user  # noqa: F401  (registers the tasks)
from dfpo.tasks.base import TASKS, Task, get, names

__all__ = ["TASKS", "Task", "get", "names"]
