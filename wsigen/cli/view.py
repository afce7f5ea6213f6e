"""``wsigen view``: pan and zoom a store (finished or being written) or an image file in the browser."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    from .app import command, err

    @app.command()
    @command()
    def view(
        slide: Annotated[Path, typer.Argument(help="A slide store (also one still being sampled) or an OME-TIFF, SVS or TIFF file.")],
        port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).", min=0, max=65535)] = 8765,
        host: Annotated[str, typer.Option(help="Address to listen on; anything but 127.0.0.1 lets others view the slide, without authentication.")] = "127.0.0.1",
        no_browser: Annotated[bool, typer.Option("--no-browser", help="Do not open a browser.")] = False,
        tile_format: Annotated[str, typer.Option(help="jpeg, or png for exact pixels.")] = "jpeg",
        quality: Annotated[int, typer.Option(help="JPEG quality of the tiles.", min=1, max=100)] = 90,
        access_log: Annotated[bool, typer.Option("--access-log", help="Print every request to stderr.")] = False,
    ):
        """Serve a slide as Deep Zoom tiles with an OpenSeadragon page; Ctrl-C stops the server."""
        from ..view import view as serve

        serve(slide, port=port, host=host, open_browser=not no_browser, tile_format=tile_format,
              quality=quality, log=err, access_log=access_log)
