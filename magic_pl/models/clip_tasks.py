"""Class names and prompt templates of the standard 8-task CLIP merging benchmark (task vectors protocol).

Tasks: SUN397, Stanford Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD (Ilharco et al., "Editing Models with Task
Arithmetic", ICLR 2023; the templates follow OpenAI CLIP's ``data/prompts.md`` as used in their released code).
Class lists are included for the six short tasks; SUN397 (397 classes) and Stanford Cars (196) are read from the
dataset's own files through :func:`register_classnames` / :func:`load_classnames`.

Templates are ``str.format`` patterns with one ``{}`` for the class name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Union

__all__ = [
    "TEMPLATES",
    "CLASSNAMES",
    "TASK_ALIASES",
    "canonical_task",
    "get_templates",
    "get_classnames",
    "register_classnames",
    "load_classnames",
]

TASK_ALIASES = {
    "sun397": "sun397",
    "stanford-cars": "stanford-cars",
    "stanford_cars": "stanford-cars",
    "stanfordcars": "stanford-cars",
    "cars": "stanford-cars",
    "resisc45": "resisc45",
    "eurosat": "eurosat",
    "svhn": "svhn",
    "gtsrb": "gtsrb",
    "mnist": "mnist",
    "dtd": "dtd",
}

TEMPLATES: dict[str, list[str]] = {
    "sun397": ["a photo of a {}.", "a photo of the {}."],
    "stanford-cars": [
        "a photo of a {}.",
        "a photo of the {}.",
        "a photo of my {}.",
        "i love my {}!",
        "a photo of my dirty {}.",
        "a photo of my clean {}.",
        "a photo of my new {}.",
        "a photo of my old {}.",
    ],
    "resisc45": [
        f"{src} {kind} of {art}{{}}."
        for art in ("", "a ", "the ")
        for src, kind in (
            ("satellite", "imagery"), ("aerial", "imagery"), ("satellite", "photo"),
            ("aerial", "photo"), ("satellite", "view"), ("aerial", "view"),
        )
    ],
    "eurosat": [
        "a centered satellite photo of {}.",
        "a centered satellite photo of a {}.",
        "a centered satellite photo of the {}.",
    ],
    "svhn": ['a photo of the number: "{}".'],
    "gtsrb": [
        'a zoomed in photo of a "{}" traffic sign.',
        'a centered photo of a "{}" traffic sign.',
        'a close up photo of a "{}" traffic sign.',
    ],
    "mnist": ['a photo of the number: "{}".'],
    "dtd": [
        "a photo of a {} texture.",
        "a photo of a {} pattern.",
        "a photo of a {} thing.",
        "a photo of a {} object.",
        "a photo of the {} texture.",
        "a photo of the {} pattern.",
        "a photo of the {} thing.",
        "a photo of the {} object.",
    ],
}

_DIGITS = [str(i) for i in range(10)]

CLASSNAMES: dict[str, list[str]] = {
    "mnist": list(_DIGITS),
    "svhn": list(_DIGITS),
    # torchvision ImageFolder order (AnnualCrop, Forest, HerbaceousVegetation, Highway, Industrial, Pasture,
    # PermanentCrop, Residential, River, SeaLake) with CLIP's descriptive names.
    "eurosat": [
        "annual crop land",
        "forest",
        "brushland or shrubland",
        "highway or road",
        "industrial buildings or commercial buildings",
        "pasture land",
        "permanent crop land",
        "residential buildings or homes or apartments",
        "river",
        "lake or sea",
    ],
    # Class ids 0..42 (CLIP's data/prompts.md descriptions).
    "gtsrb": [
        "red and white circle 20 kph speed limit",
        "red and white circle 30 kph speed limit",
        "red and white circle 50 kph speed limit",
        "red and white circle 60 kph speed limit",
        "red and white circle 70 kph speed limit",
        "red and white circle 80 kph speed limit",
        "end / de-restriction of 80 kph speed limit",
        "red and white circle 100 kph speed limit",
        "red and white circle 120 kph speed limit",
        "red and white circle red car and black car no passing",
        "red and white circle red truck and black car no passing",
        "red and white triangle road intersection warning",
        "white and yellow diamond priority road",
        "red and white upside down triangle yield right-of-way",
        "stop",
        "empty red and white circle",
        "red and white circle no truck entry",
        "red circle with white horizonal stripe no entry",
        "red and white triangle with exclamation mark warning",
        "red and white triangle with black left curve approaching warning",
        "red and white triangle with black right curve approaching warning",
        "red and white triangle with black double curve approaching warning",
        "red and white triangle rough / bumpy road warning",
        "red and white triangle car skidding / slipping warning",
        "red and white triangle with merging / narrow lanes warning",
        "red and white triangle with person digging / construction / road work warning",
        "red and white triangle with traffic light approaching warning",
        "red and white triangle with person walking warning",
        "red and white triangle with child and person walking warning",
        "red and white triangle with bicyle warning",
        "red and white triangle with snowflake / ice warning",
        "red and white triangle with deer warning",
        "white circle with gray strike bar no speed limit",
        "blue circle with white right turn arrow mandatory",
        "blue circle with white left turn arrow mandatory",
        "blue circle with white forward arrow mandatory",
        "blue circle with white forward or right turn arrow mandatory",
        "blue circle with white forward or left turn arrow mandatory",
        "blue circle with white keep right arrow mandatory",
        "blue circle with white keep left arrow mandatory",
        "blue circle with white arrows indicating a traffic circle",
        "white circle with gray strike bar indicating no passing for cars has ended",
        "white circle with gray strike bar indicating no passing for trucks has ended",
    ],
    # NWPU-RESISC45 class folders, underscores as spaces.
    "resisc45": [
        c.replace("_", " ")
        for c in (
            "airplane airport baseball_diamond basketball_court beach bridge chaparral church circular_farmland "
            "cloud commercial_area dense_residential desert forest freeway golf_course ground_track_field harbor "
            "industrial_area intersection island lake meadow medium_residential mobile_home_park mountain overpass "
            "palace parking_lot railway railway_station rectangular_farmland river roundabout runway sea_ice ship "
            "snowberg sparse_residential stadium storage_tank tennis_court terrace thermal_power_station wetland"
        ).split()
    ],
    # DTD class folders in sorted order.
    "dtd": (
        "banded blotchy braided bubbly bumpy chequered cobwebbed cracked crosshatched crystalline dotted fibrous "
        "flecked freckled frilly gauzy grid grooved honeycombed interlaced knitted lacelike lined marbled matted "
        "meshed paisley perforated pitted pleated polka-dotted porous potholed scaly smeared spiralled sprinkled "
        "stained stratified striped studded swirly veined waffled woven wrinkled zigzagged"
    ).split(),
}

_EXPECTED_SIZES = {"mnist": 10, "svhn": 10, "eurosat": 10, "gtsrb": 43, "resisc45": 45, "dtd": 47,
                   "sun397": 397, "stanford-cars": 196}
_REGISTERED: dict[str, list[str]] = {}


def canonical_task(task: str) -> str:
    """Canonical benchmark name for ``task`` (case-insensitive; ``cars`` -> ``stanford-cars``); unknown names are
    returned lower-cased unchanged."""
    key = task.strip().lower()
    return TASK_ALIASES.get(key, key)


def get_templates(task: str) -> list[str]:
    """Prompt templates of a benchmark task (``str.format`` patterns); ``ValueError`` for an unknown task."""
    t = canonical_task(task)
    if t not in TEMPLATES:
        raise ValueError(f"no prompt templates for task {task!r}; known: {sorted(TEMPLATES)} "
                         "(pass templates= yourself)")
    return list(TEMPLATES[t])


def get_classnames(task: str) -> list[str]:
    """Class names of a benchmark task, in label order.

    SUN397 and Stanford Cars are not bundled: register them first (:func:`register_classnames`), e.g. from the
    dataset's files with :func:`load_classnames`.
    """
    t = canonical_task(task)
    if t in _REGISTERED:
        return list(_REGISTERED[t])
    if t in CLASSNAMES:
        return list(CLASSNAMES[t])
    if t in ("sun397", "stanford-cars"):
        raise ValueError(
            f"class names of {t} are not bundled ({_EXPECTED_SIZES[t]} classes): call "
            f"magic_pl.models.clip_tasks.register_classnames({t!r}, names) first, e.g. with "
            "load_classnames(<file with one class per line; SUN397's ClassName.txt is understood>), or pass "
            "classnames= to the adapter"
        )
    raise ValueError(f"no class names for task {task!r}; known: {sorted(set(CLASSNAMES) | set(_REGISTERED))}")


def register_classnames(task: str, names: list[str]) -> None:
    """Register the class names of ``task`` (label order) for :func:`get_classnames`. For the benchmark tasks the
    count is checked (SUN397: 397, Stanford Cars: 196, ...)."""
    t = canonical_task(task)
    names = [str(n) for n in names]
    expected = _EXPECTED_SIZES.get(t)
    if expected is not None and len(names) != expected:
        raise ValueError(f"{t} has {expected} classes, got {len(names)} names")
    _REGISTERED[t] = names


def load_classnames(path: Union[str, os.PathLike]) -> list[str]:
    """Read class names, one per line (blank lines skipped). SUN397's ``ClassName.txt`` lines (``/a/abbey``,
    ``/b/bakery/shop``) become ``abbey``, ``bakery shop``; underscores become spaces."""
    out = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        line = re.sub(r"^/[a-z]/", "", line)
        out.append(line.replace("/", " ").replace("_", " ").strip())
    return out


def task_prompts(task: str, classnames: Optional[list[str]] = None, templates: Optional[list[str]] = None
                 ) -> tuple[list[str], list[str]]:
    """``(classnames, templates)`` for ``task``, from the arguments where given, else from the benchmark tables."""
    return (list(classnames) if classnames is not None else get_classnames(task),
            list(templates) if templates is not None else get_templates(task))
