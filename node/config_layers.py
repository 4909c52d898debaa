"""Where a config's values come from besides its file, and what a user is told when one
is wrong: environment variables (``LOCO_SECTION__KEY``), "did you mean" suggestions for
unknown keys, and the resolved config written back as TOML.

Precedence, lowest first: defaults < the TOML file < environment variables < ``--set``.
Only the CLI passes the environment in (the library never reads it).
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

ENV_PREFIX = "LOCO_"


def env_overrides(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """``[(variable, "section.key=value")]`` for every ``LOCO_SECTION__KEY`` variable (two
    underscores between levels, one inside a name: ``LOCO_OPTIM__INNER_STEPS=50`` is
    ``optim.inner_steps=50``; values are TOML literals, as with ``--set``). Variables with
    no double underscore (``LOCO_SWARM_KEY``) are not config keys and are left alone."""
    out = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        parts = name[len(ENV_PREFIX):].lower().split("__")
        if not all(parts):
            raise ValueError(f"environment variable {name}: empty key between '__' (expected "
                             f"LOCO_SECTION__KEY, e.g. LOCO_OPTIM__INNER_STEPS)")
        out.append((name, ".".join(parts) + "=" + environ[name]))
    return out


def without_env_overrides(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` less its LOCO_SECTION__KEY variables: for processes whose config file
    has them applied already (an experiment's nodes, whose variants must win over them)."""
    return {k: v for k, v in environ.items() if not (k.startswith(ENV_PREFIX) and "__" in k)}


def value_model(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the model a field holds, whether a key or index comes between): a section, a
    dict of sections (network.links.<id>) or a list of them (network.cuts)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (dict, list) and args:
        inner = args[-1]
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner, True
    return None, False


def model_at(root: type[BaseModel], path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The section model a dotted path leads to (None: it leads to no section)."""
    model, skip = root, False
    for part in path:
        if skip:  # a dict key or list index
            skip = False
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        inner, skip = value_model(field.annotation)
        if inner is None:
            return None
        model = inner
    return None if skip else model


def all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted leaf key of ``model`` (sections' own fields; not dict or list entries)."""
    keys = []
    for name, field in model.model_fields.items():
        inner, keyed = value_model(field.annotation)
        if inner is not None and not keyed:
            keys += all_keys(inner, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def suggest(root: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    """A known key close to the unknown one at ``loc``: a near spelling in the same section,
    the same name in another section, or a near spelling anywhere."""
    parent, leaf = loc[:-1], str(loc[-1])
    section = model_at(root, parent)
    if section is not None:
        close = difflib.get_close_matches(leaf, list(section.model_fields), n=1, cutoff=0.7)
        if close:
            return ".".join(str(p) for p in (*parent, close[0]))
    keys = all_keys(root)
    same_name = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    if same_name:
        return same_name[0]
    close = difflib.get_close_matches(".".join(str(p) for p in loc), keys, n=1, cutoff=0.75)
    return close[0] if close else None


def without_nones(data: Any) -> Any:
    """TOML has no null: unset keys are left out (every such key defaults to unset)."""
    if isinstance(data, dict):
        return {k: without_nones(v) for k, v in data.items() if v is not None}
    if isinstance(data, list):
        return [without_nones(v) for v in data]
    return data


def to_toml(data: dict[str, Any]) -> str:
    """A resolved config (``config_to_dict``) as a TOML document that loads back to it."""
    import tomli_w  # only the CLI writes TOML

    return tomli_w.dumps(without_nones(data))
