"""What every request handler of the console shares: settings, database, secret, templates."""

from __future__ import annotations

import datetime as dt
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy.orm import Session, sessionmaker
from starlette.requests import Request
from starlette.templating import Jinja2Templates

from dicomai.config import Settings
from dicomai.model.package import ModelPackage, OperatingPoints
from dicomai.model.profile import SiteProfile
from dicomai.store.users import Account
from dicomai.web.security import Throttle

if TYPE_CHECKING:
    from dicomai.web.demo import Demo

__all__ = ["Console", "ModelInUse", "PictureCache", "account_of", "local_time", "templates"]


def local_time(value: dt.datetime | None) -> str:
    """A timestamp as people on the node's machine read it: local time, to the second."""
    return "" if value is None else value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _person_name(value: str | None) -> str:
    """A DICOM person name (``Family^Given^Middle``) as words."""
    return " ".join(p for p in (value or "").split("^") if p)


def _duration(seconds: float | None) -> str:
    """A span of time in the unit people read it in."""
    if seconds is None:
        return "n/a"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def templates() -> Jinja2Templates:
    """The console's templates (autoescaped), with its filters."""
    env = Environment(loader=PackageLoader("dicomai.web", "templates"),
                      autoescape=select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)
    env.filters["local"] = local_time
    env.filters["person"] = _person_name
    env.filters["prob"] = lambda p: "" if p is None else f"{p:.3f}"
    env.filters["duration"] = _duration
    return Jinja2Templates(env=env)


class PictureCache:
    """The last few pictures made, by (image, prediction): a page reload draws nothing again."""

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self._items: OrderedDict[tuple[int, int | None], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int | None]) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple[int, int | None], data: bytes) -> None:
        with self._lock:
            self._items[key] = data
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


@dataclass(frozen=True)
class ModelInUse:
    """The node's model as the console shows it: the package, and the thresholds read at start."""

    package: ModelPackage
    profile: SiteProfile | None  # the site profile in force, if one was made for this model
    points_for: Callable[[str | None], OperatingPoints]  # by Body Part Examined


@dataclass
class Console:
    """The console's shared state; one per served application."""

    settings: Settings
    sessions: sessionmaker[Session]
    secret: bytes
    model: str | None  # "name version" of the loaded model; None when none is loaded
    throttle: Throttle
    loaded: ModelInUse | None = None  # the model page's; None without a model
    demo: Demo | None = None  # the try page's analysis; None without a model
    templates: Jinja2Templates = field(default_factory=templates)
    pictures: PictureCache = field(default_factory=PictureCache)


def account_of(request: Request) -> Account:
    """The logged-in user of a request (the access middleware let it through)."""
    account: Account = request.state.account
    return account
