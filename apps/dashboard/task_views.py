"""Dashboard pages: the task board, task creation and task detail."""
