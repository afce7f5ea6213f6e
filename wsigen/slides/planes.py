"""Which plane(s) of an image with more than one to read: ``--page N`` or ``--channels i,j,k``.

An image whose axes beyond Y, X and samples have more than one entry (pages, Z, T, or channels
stored as pages) is refused unless one of these picks what to read (``plane_axis``); before,
index 0 of every such axis was read silently, turning a 5-channel image into its first page.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError, WsigenError

_ALPHA = (1, 2)  # TIFF ExtraSamples: associated, unassociated alpha


@dataclass(frozen=True)
class Planes:
    """``page``: one plane (grey, or RGB where the plane has samples); ``channels``: three as R, G, B."""

    page: int | None = None
    channels: tuple[int, int, int] | None = None

    @classmethod
    def of(cls, page: int | None = None, channels=None) -> Planes | None:
        """From CLI/API values (``channels`` as "i,j,k" or three ints); None when neither is given."""
        if isinstance(channels, str):
            try:
                channels = tuple(int(v) for v in channels.split(","))
            except ValueError:
                raise UsageError(f"--channels takes three plane numbers i,j,k (got {channels!r})") from None
        if channels is not None:
            channels = tuple(int(v) for v in channels)
            if len(channels) != 3 or min(channels) < 0:
                raise UsageError(f"--channels takes three plane numbers i,j,k ≥ 0 (got {channels})")
        if page is not None and page < 0:
            raise UsageError(f"--page must be at least 0 (got {page})")
        if page is not None and channels is not None:
            raise UsageError("give --page or --channels, not both")
        if page is None and channels is None:
            return None
        return cls(page, channels)

    def indices(self) -> tuple[int, ...]:
        return (self.page,) if self.page is not None else self.channels

    def describe(self) -> dict:
        return {"page": self.page} if self.page is not None else {"channels": list(self.channels)}

    @classmethod
    def from_record(cls, d: dict) -> Planes | None:
        return cls.of(d.get("page"), d.get("channels"))

    def flag(self) -> str:
        return f"--page {self.page}" if self.page is not None else "--channels " + ",".join(map(str, self.channels))


def plane_axis(what: str, axes: str, shape: tuple[int, ...], extrasamples=(),
               planes: Planes | None = None) -> int | None:
    """The index in ``axes`` that ``planes`` picks from, or None (read as before); refuses ambiguity.

    ``axes`` are tifffile's letters (Y, X, S = samples; any other is an extra axis). An extra axis
    with more than one entry needs a pick; so do samples that are not grey, RGB, or grey/RGB with
    a sample the file marks as alpha.
    """
    desc = f"shape {tuple(shape)}, axes {axes}"
    extra = [i for i, a in enumerate(axes) if a not in "YXS" and shape[i] > 1]
    s = axes.find("S")
    ns = shape[s] if s >= 0 else 1
    if len(extra) > 1:
        raise WsigenError(f"{what} has more than one axis beyond Y, X and samples with several entries "
                          f"({desc}); convert it to one RGB or grey image first")
    if extra:
        i = extra[0]
        if planes is None:
            raise WsigenError(f"{what} has {shape[i]} planes along axis {axes[i]} ({desc}); only one RGB "
                              f"or grey image can be read: pick one with --page N or three with "
                              f"--channels i,j,k")
        if planes.channels is not None and ns > 1:
            raise WsigenError(f"{what}: --channels picks three grey planes, but each plane has {ns} "
                              f"samples ({desc}); use --page N")
        _check_range(what, planes, shape[i], axes[i], desc)
        return i
    alpha = ns in (2, 4) and any(int(e) in _ALPHA for e in extrasamples)
    plain = ns in (1, 3) or alpha or (ns == 4 and not extrasamples)  # RGBA written without the tag
    if planes is None:
        if not plain and ns == 2:
            raise WsigenError(f"{what} has 2 samples per pixel and the file does not mark the second as "
                              f"alpha ({desc}); pick one with --page N")
        if not plain:
            raise WsigenError(f"{what} has {ns} channels ({desc}); only grey, grey+alpha, RGB and RGBA "
                              "can be read as RGB: pick one with --page N or three with --channels i,j,k "
                              "(or convert it first)")
        return None
    if plain:  # one grey or RGB(A) plane: only --page 0 fits it
        if planes.indices() != (0,):
            raise WsigenError(f"{what} has one plane ({desc}); {planes.flag()} picks planes it does not have")
        return None
    _check_range(what, planes, ns, "S", desc)
    return s


def _check_range(what: str, planes: Planes, n: int, axis: str, desc: str) -> None:
    bad = [i for i in planes.indices() if i >= n]
    if bad:
        raise WsigenError(f"{what}: {planes.flag()} asks for plane {bad[0]}, but axis {axis} has {n} "
                          f"({desc})")
