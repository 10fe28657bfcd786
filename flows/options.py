"""Command-line options generated from a settings model: one `--field` per field, nothing written twice.

`with_settings(Model)` turns `def cmd(work, ..., settings: Model)` into a typer command whose
signature also holds an option per field of `Model`, with the field's type, default and
description; the values are validated as `Model` (a SettingsError names the field).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any

import typer
from pydantic import BaseModel

from preprocessing.settings import parse_settings

_CONTEXT = "cli_context_"  # typer passes the click context here: which options were given


def _option(name: str, field: Any) -> inspect.Parameter:
    flag = "--" + name.replace("_", "-")
    decls = [f"{flag}/--no-{flag[2:]}"] if field.annotation is bool else [flag]
    option = typer.Option(*decls, help=field.description or "", show_default=True)
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=field.default, annotation=Annotated[field.annotation, option]
    )


def with_settings(
    model: type[BaseModel], where: str | None = None, param: str = "settings"
) -> Callable[[Callable[..., Any]], Callable]:
    """Decorate a command taking `<param>: model`; the CLI gets one option per field instead.

    Stacks: `@with_settings(A)` over `@with_settings(LockSettings, param="lock")` fills both.
    """

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = inspect.signature(command, eval_str=True)
        inner = _CONTEXT in own.parameters  # another with_settings below: it needs the context too
        hints = {n: p.annotation for n, p in own.parameters.items() if n not in (param, _CONTEXT)}
        fields = [_option(n, f) for n, f in model.model_fields.items()]
        clash = set(hints) & set(model.model_fields)
        if clash:
            raise TypeError(f"{command.__name__}: parameters {sorted(clash)} clash with {model.__name__} fields")

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            ctx = kwargs[_CONTEXT] if inner else kwargs.pop(_CONTEXT)
            values = {n: kwargs.pop(n) for n in model.model_fields}
            # only the options given on the command line count as set (model_fields_set), as in a YAML section
            given = {n: v for n, v in values.items() if ctx.get_parameter_source(n).name != "DEFAULT"}
            settings = parse_settings(model, given, where or f"{command.__name__} settings")
            return command(**kwargs, **{param: settings})

        params = [p for n, p in own.parameters.items() if n not in (param, _CONTEXT)]
        context = inspect.Parameter(_CONTEXT, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        wrapper.__signature__ = own.replace(parameters=[*params, *fields, context])  # type: ignore[attr-defined]
        wrapper.__annotations__ = {**hints, **{p.name: p.annotation for p in fields}, _CONTEXT: typer.Context}
        return wrapper

    return decorate
