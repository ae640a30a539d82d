"""The console's views: one module per top-level mode (and its drill-down screens)."""
