"""The build: one resumable command from a teacher to evaluated presets (``gearshift build``)."""
