"""Reporting: a run's summary and its one-line form (summary), paper-style tables (tables), plots
(plots), experiment loggers (loggers) and the end-of-sweep callback (sweep)."""
