"""One-line CLI errors: the real message under jsonargparse's nested ones, and the config key of a class that failed
to build (``--model.init_args.adapter (magic_pl...TimmAdapter): 3 task names given for 2 experts``)."""

from __future__ import annotations

import importlib
import re
from typing import Any, Optional

from jsonargparse import Namespace
from lightning.pytorch import Trainer

__all__ = ["CLIError", "short_parse_error", "describe_construction_error", "one_line", "import_class"]


class CLIError(Exception):
    """A failure reported in one line; ``exit_code`` 2 for a bad command line or config, 1 for a failed run."""

    def __init__(self, message: str, exit_code: int = 2, hint: Optional[str] = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.hint = hint


def import_class(class_path: str) -> type:
    """The class (or any object) named by a dotted import path."""
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


_STRUCTURAL = re.compile(
    r"^(- )?(Does not validate against any of the Union subtypes|Subtypes:|Errors:|Given value( type)?:|"
    r"Expected a <class 'NoneType'>|Not a valid subclass of|Subclass types expect one of:)"
)
_PARSER_KEY = re.compile(r'^(?:- )?Parser key "([^"]+)":\s*(.*)$')
_CLASS_PATH = re.compile(r"^(?:- )?Problem with given class_path '([^']+)':\s*(.*)$")


def short_parse_error(message: str) -> str:
    """One line from a jsonargparse error: the deepest real message, prefixed by the option it concerns
    (``--model.init_args.calibration: Expected ... Got value: bogus``)."""
    stack: list[tuple[int, str]] = []  # (indent, key part)
    best: Optional[tuple[int, str, str]] = None  # (indent, option, text)
    for raw in message.splitlines():
        text = raw.strip()
        if not text:
            continue
        indent = len(raw) - len(raw.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        m = _PARSER_KEY.match(text) or _CLASS_PATH.match(text)
        if m:
            stack.append((indent, m.group(1) if m.re is _PARSER_KEY else "init_args"))
            text = m.group(2)
            if not text:
                continue
        elif _STRUCTURAL.match(text):
            continue
        text = text[2:] if text.startswith("- ") else text
        if best is None or indent > best[0]:
            keys = [k for _, k in stack]
            while keys and keys[-1] == "init_args":  # a class's own problem: name the option holding it
                keys.pop()
            best = (indent, ".".join(keys), text)
    if best is None:
        return " ".join(message.split())[:300]
    _, option, text = best
    option = "-c/--config" if option == "config" else option
    return f"--{option}: {text}" if option and not option.startswith("-") else (f"{option}: {text}" if option else text)


#: modules whose frames wrap the construction of the config's classes (their exceptions wrap the real one)
_WRAPPER_MODULES = ("jsonargparse", "lightning.pytorch.cli", "magic_pl.lightning.cli")


def _root_cause(err: BaseException) -> BaseException:
    """The exception a class raised, under the wrappers jsonargparse / Lightning's CLI chain around it."""
    chain = [err]
    while chain[-1].__cause__ is not None and chain[-1].__cause__ not in chain:
        chain.append(chain[-1].__cause__)
    for exc in chain:
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is None or not _is_wrapper_frame(tb.tb_frame):
            return exc
    return chain[-1]


def _constructed_class(err: BaseException) -> Optional[type]:
    """The class being built when ``err`` was raised: ``self`` of the first frame below jsonargparse's instantiation
    (the class's ``__init__``, or what decorates it)."""
    tb = err.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if not _is_wrapper_frame(frame) and "self" in frame.f_locals:
            return type(frame.f_locals["self"])
        tb = tb.tb_next
    return None


def _is_wrapper_frame(frame: Any) -> bool:
    return frame.f_globals.get("__name__", "").startswith(_WRAPPER_MODULES)


def _config_key_of(cls: type, cfg: Any, prefix: str = "") -> Optional[str]:
    """The config key whose ``class_path`` names ``cls`` (depth first), e.g. ``model.init_args.adapter``."""
    if not isinstance(cfg, Namespace):
        return None
    if isinstance(cfg.get("class_path"), str):
        try:
            if import_class(cfg.class_path) is cls:
                return prefix.rstrip(".")
        except (ImportError, AttributeError, ValueError):
            pass
    for key, value in vars(cfg).items():
        found = _config_key_of(cls, value, f"{prefix}{key}.")
        if found is not None:
            return found
    return None


def describe_construction_error(err: BaseException, cfg: Any) -> str:
    """``--model.init_args.adapter (magic_pl...TimmAdapter): 3 task names given for 2 experts`` for an error raised
    while the config's classes were built."""
    root = _root_cause(err)
    message = one_line(root)
    cls = _constructed_class(root)
    if cls is None:
        return message
    key = "trainer" if issubclass(cls, Trainer) else _config_key_of(cls, cfg)
    where = f"{cls.__module__}.{cls.__qualname__}"
    return f"--{key} ({where}): {message}" if key else f"{where}: {message}"


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if isinstance(err, KeyError) and len(err.args) == 1:
        text = f"key {err.args[0]!r}"
    if not text or not isinstance(err, (ValueError, OSError, RuntimeError, TypeError)):
        text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= 600 else text[:597] + "..."
