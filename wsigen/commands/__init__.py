"""CLI command groups, one module each; ``wsigen.cli`` registers every module's ``register(app)``."""
