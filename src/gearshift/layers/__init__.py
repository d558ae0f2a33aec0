"""Mixer modules (FA/SWA, GDN, KDA) built on the math in ``gearshift.ops``."""
