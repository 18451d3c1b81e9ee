"""``scout-diff-cache [run] [options] [-- mitmproxy arguments]``, ``scout-diff-cache preview``, ``... doctor``.

``run`` (the default) checks every setting before anything starts (a bad one is one line and exit
status 2), then runs mitmdump, or mitmweb with ``--web``, in this process with the addons loaded
and ``--mode reverse:TARGET_API_URL --listen-host HOST -p PORT``. Settings come from the flags, the
environment, the config file (``--config``, else $SCOUT_CONFIG, else
``~/.config/scout-diff-cache/config.yaml``), then the defaults.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Literal, get_args

from .. import __version__, preview
from ..launch import LaunchSettings, launch_env_name, launch_help, load_launch, reverse_mode
from ..settings import (
    CONFIG_ENV_VAR,
    LAUNCH_NAMES,
    SECRET_SETTINGS,
    SETTING_NAMES,
    ConfigError,
    Settings,
    env_name,
    load_settings,
    option_name,
    resolve_config_path,
    setting_help,
)
from ..wiring import checked_context_provider
from . import doctor

PROG = "scout-diff-cache"
COMMANDS = ("run", "preview", "doctor")
EXIT_BAD_SETTING = 2
# mitmweb's flow list with the comment column, whose start is each chat's verdict ("hit 99.8% · snap ...").
WEB_COLUMNS = ("icon", "path", "method", "status", "comment", "size", "time")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """``--config``, the launch settings and one flag per setting (its help from the settings model)."""
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f"config file (default: ${CONFIG_ENV_VAR}, else ~/.config/scout-diff-cache/config.yaml if present)",
    )
    launch = parser.add_argument_group("where it listens and what it fronts")
    for name in LAUNCH_NAMES:
        default = LaunchSettings.model_fields[name].default
        text = f"{launch_help(name)} Env {launch_env_name(name)}; default {default}."
        launch.add_argument(flag(name), metavar=name.upper(), help=_escaped(text))
    settings = parser.add_argument_group("settings (each also an environment variable, and a config file key)")
    for name in SETTING_NAMES:
        field = Settings.model_fields[name]
        default = "unset" if name in SECRET_SETTINGS or field.default in (None, ()) else field.default
        if isinstance(default, bool):
            default = str(default).lower()
        plural = " Repeat, or separate with commas." if field.annotation == tuple[str, ...] else ""
        if name == "secret_patterns":
            plural = " Repeat for several."
        stated = "" if "default" in setting_help(name) else f"; default {default}"
        settings.add_argument(
            flag(name),
            metavar=metavar(field.annotation),
            action="append" if field.annotation == tuple[str, ...] else "store",
            help=_escaped(f"{setting_help(name)}{plural} Env {env_name(name)}{stated}."),
        )


def metavar(annotation: object) -> str:
    if annotation is bool:
        return "true|false"
    if annotation in (int, int | None):
        return "N"
    if annotation is float:
        return "NUMBER"
    if annotation == tuple[str, ...]:
        return "ITEM"
    choices = get_args(annotation) if getattr(annotation, "__origin__", None) is Literal else ()
    return "|".join(choices) if choices else "TEXT"


def _escaped(help_text: str) -> str:
    """argparse formats help with %: a literal one is doubled."""
    return help_text.replace("%", "%%")


def run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        usage=f"{PROG} [run] [--web] [options] [-- mitmproxy arguments]\n       {PROG} preview|doctor [options]",
        description="A caching proxy that puts a whole git repository in front of every chat request to an "
        "OpenAI-compatible model server. Commands: run (the default), preview (what would be sent, no server), "
        "doctor (check git, the repository, the upstream, its window, tokenizer and cache reporting).",
        epilog="Arguments after -- go to mitmdump/mitmweb unchanged (for example: -- --set web_port=8082).",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--web", action="store_true", help="run mitmweb (flows in a browser) instead of mitmdump")
    add_setting_flags(parser)
    return parser


def flag_values(args: argparse.Namespace) -> dict[str, object]:
    """The settings given as flags, by setting name; lists split as the environment splits them."""
    values: dict[str, object] = {}
    for name in SETTING_NAMES:
        value = getattr(args, name)
        if value is None:
            continue
        if isinstance(value, list):
            separator = "\n" if name == "secret_patterns" else ","
            value = [part.strip() for item in value for part in item.split(separator) if part.strip()]
        values[name] = value
    return values


def mitmproxy_arguments(launch: LaunchSettings, config: str | None, settings: Mapping[str, object]) -> list[str]:
    arguments = ["--mode", reverse_mode(launch), "--listen-host", launch.host, "-p", str(launch.port)]
    if config is not None:
        arguments += ["--set", f"scout_config={config}"]
    for name, value in settings.items():
        for item in value if isinstance(value, list) else [value]:
            arguments += ["--set", f"{option_name(name)}={item}"]
    return arguments


def checked(args: argparse.Namespace) -> tuple[LaunchSettings, dict[str, object], str | None]:
    """Everything the proxy will check at start, checked now: raises ConfigError with one readable line."""
    config_path = resolve_config_path(args.config, os.environ)
    flags = flag_values(args)
    launch, _ = load_launch({name: getattr(args, name) for name in LAUNCH_NAMES}, os.environ, config_path)
    settings, _ = load_settings(flags, os.environ, config_path)
    checked_context_provider(settings, watch=False)  # the repository, exclusion and secret patterns
    return launch, flags, str(config_path) if config_path is not None else None


def run(argv: Sequence[str]) -> int:
    own, passed_on = _split_at_double_dash(argv)
    args = run_parser().parse_args(own)
    try:
        launch, flags, config = checked(args)
    except ConfigError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_BAD_SETTING
    from .proxy import run_mitmproxy  # noqa: PLC0415 (mitmproxy takes 0.5 s to import: not for preview or doctor)

    arguments = mitmproxy_arguments(launch, config, flags)
    if args.web and not any(argument.startswith("web_columns=") for argument in passed_on):
        arguments += [part for column in WEB_COLUMNS for part in ("--set", f"web_columns={column}")]
    return run_mitmproxy([*arguments, *passed_on], web=args.web)


def _split_at_double_dash(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """The command's own arguments, and those after ``--`` (mitmproxy's)."""
    if "--" in argv:
        index = list(argv).index("--")
        return list(argv[:index]), list(argv[index + 1 :])
    return list(argv), []


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else "run"
    rest = argv[1:] if argv and argv[0] in COMMANDS else argv
    try:
        if command == "preview":
            return preview.run(rest, prog=f"{PROG} preview")
        if command == "doctor":
            return doctor.run(rest)
        return run(rest)
    except BrokenPipeError:  # `scout-diff-cache preview | head`: the reader left; not an error
        _silence_stdout()
        return 0
    except KeyboardInterrupt:
        return 130


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that Python's flush at exit does not raise BrokenPipeError again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def entry() -> None:
    """The console script."""
    sys.exit(main())
