"""CLI command groups; each module registers its commands on the app with ``register(app)``."""
