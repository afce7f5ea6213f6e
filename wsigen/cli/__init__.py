"""The ``wsigen`` command line: ``app`` (typer, in ``app``) and one module per command group."""


def main() -> None:
    from .app import main as run

    run()


def __getattr__(name: str):
    if name == "app":
        from .app import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
