"""MkDocs hook: the reference pages, generated from the code each time the site is built.

A page asks for a generated block with an HTML comment on a line of its own (invisible where
the Markdown is read as it is, e.g. on GitHub):

    <!-- reference: settings-all -->        every settings model: one table each
    <!-- reference: settings DedupSettings -->  one model's table
    <!-- reference: cli-all -->              every `dcgan-pipeline` command, from the Typer app
    <!-- reference: pipeline-config -->      the keys of the pipeline YAML (flows/config.py)
    <!-- reference: deployments -->          the deployments of prefect.yaml

Everything comes from the code: the settings models are found as the subclasses of
`preprocessing.settings.Settings`; a field's type, default, limits and description are read
from pydantic; its CLI option from the Typer app itself (`typer.main.get_command`); its YAML key
from `PipelineConfig`'s fields; its deployments from prefect.yaml and the flows' signatures.
So a new field, model, option or deployment appears in the docs with no edit here. An unknown
marker fails the build.
"""

from __future__ import annotations

import ast
import html
import inspect
import json
import posixpath
import re
import sys
import textwrap
import types
import typing
from collections import defaultdict
from functools import cache
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # the project need not be installed to build its docs
    sys.path.insert(0, str(ROOT))

SETTINGS_PAGE = "reference/settings.md"
CLI_PAGE = "reference/cli.md"
PIPELINE_PAGE = "pipeline-config.md"
PROG = "dcgan-pipeline"
# Imported before the settings models are collected: every module that declares or uses one.
MODULES = (
    "preprocessing.settings",
    "preprocessing.locks",
    "dedup.settings",
    "dcgan.settings",
    "flows.config",
    "flows.cli",
)
# Listed first, in this order (the stages' order); any other module's models follow, by name.
MODULE_ORDER = ("preprocessing.settings", "dedup.settings", "dcgan.settings")
PIPELINE_MODULE = "flows.config"  # the pipeline YAML's own models: rendered by `pipeline-config`

MARKER = re.compile(r"^<!--\s*reference:\s*([\w-]+)(?:\s+([\w.-]+))?\s*-->\s*$", re.MULTILINE)
NONE = type(None)


# --------------------------------------------------------------------------- text helpers


def text(value: str) -> str:
    """Plain text for a Markdown table cell: no HTML, no emphasis, no column break; `code` kept."""
    out = []
    for i, part in enumerate(re.split(r"(`[^`]*`)", value)):
        if i % 2:  # a code span: Markdown leaves its content alone
            out.append(part)
            continue
        part = html.escape(part, quote=False)
        for ch in "|*_[]{}":  # a column break, emphasis, a link, an attribute list (attr_list)
            part = part.replace(ch, f"&#{ord(ch)};")
        out.append(part)
    return " ".join("".join(out).split())


def code(value: Any) -> str:
    s = str(value)
    tick = "``" if "`" in s else "`"
    return f"{tick}{s}{tick}"


def value_text(value: Any) -> str:
    """A default as it is written in YAML (and on the command line)."""
    from pydantic import BaseModel

    if value is None:
        return "not set"
    if isinstance(value, BaseModel):
        return "its defaults"
    if isinstance(value, bool):
        return code("true" if value else "false")
    if isinstance(value, str):
        return code(value) if value else '`""`'
    if isinstance(value, (list, tuple, dict)):
        return code(json.dumps(value))
    return code(value)


def rel(page_src: str, target_src: str, anchor: str = "") -> str:
    """A link from one docs page to another (MkDocs checks and rewrites it)."""
    if page_src == target_src:
        return f"#{anchor}"
    path = posixpath.relpath(target_src, posixpath.dirname(page_src) or ".")
    return f"{path}#{anchor}" if anchor else path


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell or "—" for cell in row) + " |" for row in rows]
    return [*lines, ""]


# --------------------------------------------------------------------------- settings models


@cache
def settings_models() -> tuple[type, ...]:
    """Every subclass of `Settings` with fields declared in MODULES (the user's settings; not internal configs such
    as dcgan.train.TrainConfig, whatever else happens to be imported), outside flows.config, in a stable order."""
    import importlib

    for name in MODULES:
        importlib.import_module(name)
    from preprocessing.settings import Settings

    found, todo = [], list(Settings.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls not in found and cls.model_fields and cls.__module__ in MODULES and cls.__module__ != PIPELINE_MODULE:
            found.append(cls)

    def order(cls: type) -> tuple:
        mod = cls.__module__
        first = MODULE_ORDER.index(mod) if mod in MODULE_ORDER else len(MODULE_ORDER)
        return (first, mod, inspect.getsourcelines(cls)[1])

    return tuple(sorted(found, key=order))


def own_models(cls: type) -> list[type]:
    """`cls` and the settings models it extends, nearest first."""
    models = settings_models()
    return [c for c in cls.__mro__ if c in models]


def type_text(ann: Any, page_src: str) -> str:
    from pydantic import BaseModel

    origin, args = get_origin(ann), get_args(ann)
    if ann is NONE:
        return "none"
    if origin is typing.Annotated:
        return type_text(args[0], page_src)
    if origin is Literal:
        return " or ".join(code(a) for a in args)
    if origin in (Union, types.UnionType):
        parts = [type_text(a, page_src) for a in args if a is not NONE]
        return " or ".join(parts) + (", optional" if NONE in args else "")
    if origin in (list, tuple, set):
        return f"list of {type_text(args[0], page_src)}" if args else "list"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        target = own_models(ann)
        if target:
            return f"[{target[0].__name__}]({rel(page_src, SETTINGS_PAGE, target[0].__name__)})"
        return ann.__name__
    names = {int: "integer", float: "number", bool: "true/false", str: "text"}
    return names.get(ann, getattr(ann, "__name__", str(ann)))


def limits_text(field: Any) -> list[str]:
    out = []
    for m in field.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if getattr(m, attr, None) is not None and type(m).__name__.lower() == attr:
                out.append(f"{sign} {getattr(m, attr)}")
        if type(m).__name__ == "MinLen":
            out.append(f"at least {m.min_length} item{'s' if m.min_length != 1 else ''}")
        if type(m).__name__ == "MaxLen":
            out.append(f"at most {m.max_length} items")
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    kind = {"file": "an existing file", "dir": "an existing folder", "any": "an existing path"}
    if extra.get("path") in kind:
        out.append(kind[extra["path"]] + " (nothing is downloaded)")
    return out


def _formatted(node: ast.expr, names: dict[str, Any]) -> str:
    if isinstance(node, ast.Constant):
        return str(node.value)
    if isinstance(node, ast.JoinedStr):
        return "".join(_formatted(v, names) for v in node.values)
    if isinstance(node, ast.FormattedValue):
        inner = node.value
        if isinstance(inner, ast.Name) and inner.id in names and not callable(names[inner.id]):
            return str(names[inner.id])
        return "…"
    return "…"


def raised_messages(func: Any) -> list[str]:
    """The messages of the ValueErrors a validator raises, as written in its source."""
    func = inspect.unwrap(getattr(func, "__func__", func))
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    except (OSError, TypeError, SyntaxError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
            msg = re.sub(r",? got …$", "", _formatted(node.exc.args[0], func.__globals__))
            if msg.strip("… "):
                out.append(msg)
    return out


def field_rules(model: type) -> tuple[dict[str, list[str]], list[str]]:
    """Rules of one field (field validators) and across fields (model validators), as error messages."""
    decorators = model.__pydantic_decorators__
    per_field: dict[str, list[str]] = defaultdict(list)
    for dec in decorators.field_validators.values():
        for name in dec.info.fields:
            per_field[name] += raised_messages(dec.func)
    across = [m for dec in decorators.model_validators.values() for m in raised_messages(dec.func)]
    return per_field, across


# --------------------------------------------------------------------------- the CLI


@cache
def cli() -> tuple[Any, dict[str, Any], dict[str, list[tuple[str, type]]]]:
    """The click group of the Typer app, its commands by name, and each command's settings models."""
    import typer.main
    from pydantic import BaseModel

    from flows.cli import app

    group = typer.main.get_command(app)
    models: dict[str, list[tuple[str, type]]] = {}
    for info in app.registered_commands:
        name = info.name or info.callback.__name__.lower().replace("_", "-")
        original = inspect.unwrap(info.callback)
        params = inspect.signature(original, eval_str=True).parameters.values()
        models[name] = [
            (p.name, p.annotation)
            for p in params
            if isinstance(p.annotation, type) and issubclass(p.annotation, BaseModel)
        ]
    return group, dict(group.commands), models


def commands_of(model: type) -> list[str]:
    _, _, models = cli()
    return [name for name, used in models.items() if any(m is model for _, m in used)]


def cli_flags(model: type, field: str) -> str:
    """The option(s) a field has on the command line, read from the commands that take the model."""
    _, commands, _ = cli()
    flags = []
    for name in commands_of(model):
        for param in commands[name].params:
            if param.name == field:
                decl = " / ".join(code(o) for o in [*param.opts, *param.secondary_opts])
                if decl not in flags:
                    flags.append(decl)
    return "; ".join(flags)


def context(command: Any, name: str) -> Any:
    group, _, _ = cli()
    parent = group.context_class(group, info_name=PROG)
    return command.context_class(command, info_name=name, parent=parent)


# --------------------------------------------------------------------------- the pipeline YAML


def section_models(ann: Any, in_union: bool = False) -> list[tuple[type, str | None]]:
    """The models a PipelineConfig field holds; in a union (the sources), with the `type` each stands for."""
    from pydantic import BaseModel

    origin, args = get_origin(ann), get_args(ann)
    if origin is typing.Annotated:
        return section_models(args[0], in_union)
    if origin is list:
        return [m for a in args for m in section_models(a, in_union)]
    if origin in (Union, types.UnionType):
        members = [a for a in args if a is not NONE]
        return [m for a in members for m in section_models(a, in_union or len(members) > 1)]
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        kind = ann.model_fields.get("type") if in_union else None
        return [(ann, kind.default if kind is not None and isinstance(kind.default, str) else None)]
    return []


@cache
def yaml_homes() -> dict[type, list[tuple[str, str | None, type]]]:
    """settings model -> [(YAML key prefix, source type or None, the pipeline's model)]."""
    from flows import config

    homes: dict[type, list[tuple[str, str | None, type]]] = defaultdict(list)
    for key, field in config.PipelineConfig.model_fields.items():
        for section, kind in section_models(field.annotation):
            prefix = f"{key}[]" if get_origin(field.annotation) is list else key
            for model in own_models(section):
                homes[model].append((prefix, kind, section))
    return homes


def yaml_key(model: type, field: str) -> str:
    from flows import config

    from_extract = getattr(config, "FROM_EXTRACT", ())
    keys = []
    for prefix, kind, _ in yaml_homes().get(model, []):
        if kind is not None and field in from_extract:
            key = f"{code('extract.' + field)} (once, for every source)"
        else:
            key = code(f"{prefix}.{field}")
        if key not in keys:
            keys.append(key)
    return "; ".join(keys)


def yaml_where(model: type, page_src: str) -> str:
    places = []
    for prefix, kind, _ in yaml_homes().get(model, []):
        if kind:
            label = f"an item of {code(prefix[:-2] + ':')} with {code('type: ' + kind)}"
            place = f"[{label}]({rel(page_src, PIPELINE_PAGE, 'source-' + kind)})"
        else:
            place = f"[{code(prefix + ':')}]({rel(page_src, PIPELINE_PAGE, 'section-' + prefix)})"
        if place not in places:
            places.append(place)
    return ", ".join(places)


# --------------------------------------------------------------------------- deployments


@cache
def flow_info(entrypoint: str) -> dict[str, Any]:
    """A flow's name and its parameters' annotations, read from its source (Prefect is not imported)."""
    module, _, func = entrypoint.rpartition(".")
    path = ROOT / (module.replace(".", "/") + ".py")
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == func:
            name = func.replace("_", "-")
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call):
                    for kw in dec.keywords:
                        if kw.arg == "name" and isinstance(kw.value, ast.Constant):
                            name = kw.value.value
            args = {a.arg: ast.unparse(a.annotation) if a.annotation else "" for a in node.args.args}
            args.update({a.arg: ast.unparse(a.annotation) if a.annotation else "" for a in node.args.kwonlyargs})
            return {"name": name, "params": args}
    raise PluginError(f"reference hook: prefect.yaml entrypoint {entrypoint} not found in {path}")


@cache
def deployments() -> list[dict[str, Any]]:
    import yaml

    return yaml.safe_load((ROOT / "prefect.yaml").read_text()).get("deployments") or []


def deployments_of(model: type) -> list[str]:
    out = []
    for dep in deployments():
        info = flow_info(dep["entrypoint"])
        params = [p for p, ann in info["params"].items() if model.__name__ in re.findall(r"\w+", ann)]
        out += [f"{code(info['name'] + '/' + dep['name'])} (parameter {code(p)})" for p in params]
    return out


# --------------------------------------------------------------------------- renderers


def render_model(model: type, page_src: str, level: int = 2) -> list[str]:
    from pydantic_core import PydanticUndefined

    per_field, across = field_rules(model)
    lines = [f"{'#' * level} {model.__name__} {{#{model.__name__}}}", ""]
    doc = inspect.getdoc(model) or ""
    if doc:
        lines += [text(doc.split("\n\n")[0]), ""]
    where = [f"Declared in {code(model.__module__.replace('.', '/') + '.py')}."]
    base = own_models(model)[1:]
    if base:
        where.append(f"Extends [{base[0].__name__}]({rel(page_src, SETTINGS_PAGE, base[0].__name__)}).")
    cmds = commands_of(model)
    if cmds:
        links = ", ".join(f"[{code(PROG + ' ' + c)}]({rel(page_src, CLI_PAGE, c)})" for c in cmds)
        where.append(f"Command line: {links}.")
    yaml_place = yaml_where(model, page_src)
    where.append(f"Pipeline YAML: {yaml_place}." if yaml_place else "Not a section of the pipeline YAML.")
    deps = deployments_of(model)
    if deps:
        where.append(f"Deployments: {', '.join(deps)}.")
    lines += [" ".join(where), ""]

    rows = []
    for name, field in model.model_fields.items():
        if field.is_required():
            default = "required"
        elif field.default_factory is not None:
            default = value_text(field.default_factory())
        else:
            default = value_text(None if field.default is PydanticUndefined else field.default)
        limits = limits_text(field) + [text(m) for m in per_field.get(name, [])]
        rows.append(
            [
                f'<a id="{model.__name__}.{name}"></a>{code(name)}',
                type_text(field.annotation, page_src),
                default,
                "; ".join(limits),
                cli_flags(model, name),
                yaml_key(model, name),
                text(field.description or ""),
            ]
        )
    lines += table(["Field", "Type", "Default", "Limits", "CLI option", "YAML key", "Description"], rows)
    if across:
        lines += ["Checked across fields (the error you get):", ""]
        lines += [f"- {text(m)}" for m in across]
        lines.append("")
    return lines


def render_settings_all(page_src: str) -> list[str]:
    lines: list[str] = []
    for model in settings_models():
        lines += render_model(model, page_src)
    return lines


def render_settings(page_src: str, name: str | None) -> list[str]:
    for model in settings_models():
        if model.__name__ == name:
            return render_model(model, page_src, level=3)
    known = ", ".join(m.__name__ for m in settings_models())
    raise PluginError(f"{page_src}: no settings model {name!r} (known: {known})")


def split_help(help_text: str) -> tuple[str, str]:
    """Click's help record ends in `[default: x]` and/or `[required]`: give them their own column."""
    main, notes = help_text, []
    while m := re.search(r"\s*\[(default: [^\[\]]*|required)\]\s*$", main):
        notes.insert(0, m.group(1))
        main = main[: m.start()]
    return main.strip(), "; ".join(notes)


def render_cli_all(page_src: str) -> list[str]:
    group, commands, models = cli()
    lines = [text(inspect.cleandoc(group.help or "").split("\n\n")[0]), ""]
    lines += table(
        ["Command", "What it does"],
        [[f"[{code(name)}](#{name})", text((cmd.help or "").strip().split("\n")[0])] for name, cmd in commands.items()],
    )
    for name, cmd in commands.items():
        ctx = context(cmd, name)
        required = [usage(p, ctx) for p in cmd.params if getattr(p, "required", False)]
        line = " ".join([PROG, name, *required, "[OPTIONS]"])
        lines += [f"## {PROG} {name} {{#{name}}}", "", "```text", line, "```", ""]
        doc = inspect.cleandoc(cmd.help or "")
        lines += [text_block(doc), ""]
        by_field = {field: model for _, model in models.get(name, []) for field in model.model_fields}
        rows = []
        for param in cmd.params:
            record = param.get_help_record(ctx)
            if record is None:
                continue
            decl, help_text = record
            main, notes = split_help(help_text)
            model = by_field.get(param.name)
            setting = (
                f"[{model.__name__}.{param.name}]({rel(page_src, SETTINGS_PAGE, model.__name__ + '.' + param.name)})"
                if model is not None
                else ""
            )
            notes = notes.replace("default: ", "")
            rows.append([code(decl), text(main), text(notes), setting])
        lines += table(["Option", "Description", "Default", "Setting"], rows)
    return lines


def usage(param: Any, ctx: Any) -> str:
    """`--db <path>` for a required option, as its help record writes it."""
    record = param.get_help_record(ctx)
    return record[0].split(" / ")[0] if record else param.opts[0]


def text_block(doc: str) -> str:
    """A docstring as Markdown: paragraphs and numbered lists kept, raw HTML escaped."""
    out = []
    for line in doc.splitlines():
        parts = re.split(r"(`[^`]*`)", line)
        plain = (html.escape(p, quote=False).replace("{", "&#123;").replace("}", "&#125;") for p in parts[::2])
        out.append("".join(next(plain) if i % 2 == 0 else p for i, p in enumerate(parts)))
    return "\n".join(out)


def render_pipeline_config(page_src: str) -> list[str]:
    from flows import config

    pc = config.PipelineConfig
    lines = ["### Top-level keys", ""]
    rows = []
    for key, field in pc.model_fields.items():
        default = "required" if field.is_required() else value_text(field.default)
        held = section_models(field.annotation)
        kinds = [kind for _, kind in held if kind is not None]
        if kinds:
            kind_text = "list of " if get_origin(field.annotation) is list else ""
            kind_text += " or ".join(f"[{code('type: ' + k)}](#source-{k})" for k in kinds)
        elif held:
            kind_text = f"[section](#section-{key})"
        else:
            kind_text = type_text(field.annotation, page_src)
        description = field.description
        if description is None and held:
            description = (inspect.getdoc(held[0][0]) or "").split("\n\n")[0]
        rows.append([f'<a id="pipeline.{key}"></a>{code(key)}', kind_text, default, text(description or "")])
    lines += table(["Key", "Type", "Default", "Description"], rows)

    from_extract = getattr(config, "FROM_EXTRACT", ())
    seen: set[type] = set()
    for key, field in pc.model_fields.items():
        for section, kind in section_models(field.annotation):
            if section in seen:
                continue
            seen.add(section)
            bases = own_models(section)
            base = bases[0] if bases else None
            extra = {n: f for n, f in section.model_fields.items() if base is None or n not in base.model_fields}
            if kind is not None:
                title, anchor = f"{key}: type {kind}", f"source-{kind}"
            else:
                title, anchor = f"{key}:", f"section-{key}"
            lines += [f"### {code(title)} {{#{anchor}}}", ""]
            doc = inspect.getdoc(section) if section.__doc__ else ""
            if doc and section.__module__ == config.__name__:
                lines += [text(doc.split("\n\n")[0]), ""]
            if base is not None:
                excl = [f for f in from_extract if f in base.model_fields] if kind is not None else []
                but = f", except {', '.join(code(f) for f in excl)} (set once in {code('extract:')})" if excl else ""
                lines += [
                    f"Every field of [{base.__name__}]({rel(page_src, SETTINGS_PAGE, base.__name__)}){but}"
                    + (", plus:" if extra else "."),
                    "",
                ]
            if extra:
                rows = []
                for name, f in extra.items():
                    default = "required" if f.is_required() else value_text(f.default)
                    rows.append(
                        [
                            f'<a id="pipeline.{anchor}.{name}"></a>{code(name)}',
                            type_text(f.annotation, page_src),
                            default,
                            "; ".join(limits_text(f)),
                            text(f.description or ""),
                        ]
                    )
                lines += table(["Key", "Type", "Default", "Limits", "Description"], rows)
    _, across = field_rules(pc)
    if across:
        lines += ["### Checked across sections", "", "The error you get:", ""]
        lines += [f"- {text(m)}" for m in across] + [""]
    return lines


def render_deployments(page_src: str) -> list[str]:
    rows = []
    for dep in deployments():
        info = flow_info(dep["entrypoint"])
        pool = (dep.get("work_pool") or {}).get("name", "")
        limit = dep.get("concurrency_limit")
        limit_s = f"{limit['limit']} ({limit.get('collision_strategy', '').lower()})" if isinstance(limit, dict) else ""
        limit_s = limit_s or (str(limit) if limit else "")
        starts = [
            f"cron {code(s['cron'])} {s.get('timezone', '')}".strip() for s in dep.get("schedules") or [] if "cron" in s
        ]
        for trig in dep.get("triggers") or []:
            starts += [f"event {code(e)}" for e in trig.get("expect") or []]
        params = dep.get("parameters") or {}
        settings = [
            f"[{ann}]({rel(page_src, SETTINGS_PAGE, ann)})"
            for p, ann in info["params"].items()
            if any(m.__name__ == ann for m in settings_models())
        ]
        rows.append(
            [
                code(f"{info['name']}/{dep['name']}"),
                code(dep["entrypoint"]),
                code(pool) if pool else "",
                limit_s,
                "; ".join(starts),
                code(json.dumps(params)) if params else "",
                ", ".join(settings),
            ]
        )
    return table(
        ["Deployment", "Entrypoint", "Work pool", "Concurrency", "Started by", "Default parameters", "Settings"], rows
    )


RENDERERS = {
    "settings-all": lambda page, arg: render_settings_all(page),
    "settings": render_settings,
    "cli-all": lambda page, arg: render_cli_all(page),
    "pipeline-config": lambda page, arg: render_pipeline_config(page),
    "deployments": lambda page, arg: render_deployments(page),
}


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    src = page.file.src_uri

    def replace(m: re.Match) -> str:
        kind, arg = m.group(1), m.group(2)
        if kind not in RENDERERS:
            raise PluginError(f"{src}: unknown reference block {kind!r} (known: {', '.join(RENDERERS)})")
        return "\n".join(RENDERERS[kind](src, arg))

    return MARKER.sub(replace, markdown)
