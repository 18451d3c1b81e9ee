"""Settings as mitmproxy options, and the repository context they configure.

Every setting is an option ``scout_<name>`` declared in ``load`` with its effective default: the
value the environment, else the config file, else the built-in default gives it at start, so
``mitmdump --options`` and mitmweb's Options page show what the proxy will use. An option the
user changed (``--set``, mitmweb) wins over those sources; one left at its default takes them
(read again when ``scout_config`` names another file). The keys are the exception: their
options default to unset and never show a value from the environment.

Every option but the list of patterns is a string, whatever the setting's type: mitmproxy parses
a typed ``--set`` value while it registers the script, and a value it cannot parse there (``--set
scout_max_file_bytes=abc``) ends the script's loading without an error at startup, so mitmdump
would go on as a plain proxy, forwarding chat requests without their context. As strings, every
value reaches ``configure``, which validates the merged settings (a bad value is an
``OptionsError`` naming the setting and its source, and mitmdump stops) and builds the context
provider and change monitor.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader

from .. import __version__
from ..chat.conversation import ConversationStore
from ..context.retrieval import Retriever
from ..settings import (
    CONFIG_OPTION,
    SECRET_SETTINGS,
    SETTING_NAMES,
    ConfigError,
    Settings,
    changed_settings,
    load_settings,
    option_name,
    resolve_config_path,
    setting_help,
)
from ..wiring import checked_context_provider
from .state import ScoutState

logger = logging.getLogger(__name__)

OPTIONAL_STR: Any = str | None


def option_type(setting: str) -> Any:
    """The mitmproxy option type of a setting: a list of strings, or a string (see the module docstring)."""
    annotation = Settings.model_fields[setting].annotation
    if annotation == tuple[str, ...]:
        return Sequence[str]
    return OPTIONAL_STR if Settings.model_fields[setting].default is None else str


def option_choices(setting: str) -> Sequence[str] | None:
    annotation = Settings.model_fields[setting].annotation
    return get_args(annotation) if getattr(annotation, "__origin__", None) is Literal else None


def option_default(setting: str, effective: Settings) -> Any:
    """The effective value as the option shows it: "true"/"false", digits, text, a list; None for a key."""
    value = getattr(effective, setting)
    if setting in SECRET_SETTINGS or value is None:
        return None
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def effective_defaults(config_path: Path | None) -> Settings:
    """The settings from the environment and the config file alone; the built-in ones if those are bad."""
    try:
        settings, _ = load_settings({}, os.environ, config_path)
    except ConfigError:
        return Settings.model_validate({})  # configure reports the problem, naming the setting
    return settings


class ScoutOptions:
    """Declares the ``scout_*`` options; turns them into the shared settings and context provider."""

    def __init__(self, state: ScoutState) -> None:
        self.state = state

    def load(self, loader: Loader) -> None:
        loader.add_option(
            CONFIG_OPTION,
            OPTIONAL_STR,
            None,
            "config.yaml to read (default: $SCOUT_CONFIG, else the project's own config.yaml).",
        )
        defaults = effective_defaults(resolve_config_path(None, os.environ))
        for setting in SETTING_NAMES:
            source = (
                "Unset: environment, then config.yaml; never shown here."
                if setting in SECRET_SETTINGS
                else f"Environment {setting.upper()}; config.yaml key {setting}."
            )
            loader.add_option(
                option_name(setting),
                option_type(setting),
                option_default(setting, defaults),
                f"{setting_help(setting)} {source}",
                choices=option_choices(setting),
            )

    def configure(self, updated: set[str]) -> None:
        ours = {CONFIG_OPTION, *(option_name(s) for s in SETTING_NAMES)}
        if self.state.settings is not None and not (updated & ours):
            return
        changed = {s: getattr(ctx.options, option_name(s)) for s in SETTING_NAMES if option_changed(option_name(s))}
        try:
            config_path = resolve_config_path(ctx.options.scout_config, os.environ)
            settings, sources = load_settings(changed, os.environ, config_path)
            provider = checked_context_provider(settings, self.state.metrics)
        except ConfigError as e:
            raise options_error(f"scout-diff-cache: {e}") from None
        self.done()
        self.state.settings, self.state.provider = settings, provider
        self.state.conversations = ConversationStore(settings.max_conversations)  # a new repository: none continue
        self.state.retriever = Retriever(provider.repo, provider.snapshot_limits)
        logger.info(
            "scout-diff-cache %s: repository %s, config file %s; %s",
            __version__,
            provider.repo.toplevel,
            config_path or "none",
            changed_settings(settings, sources),
        )

    def done(self) -> None:
        if self.state.provider is not None:
            self.state.provider.monitor.stop()
        if self.state.retriever is not None:
            self.state.retriever.close()


def option_changed(name: str) -> bool:
    """Set away from its declared default (``--set``, mitmweb's Options page, mitmproxy's own config file)."""
    changed: bool = ctx.options.has_changed(name)  # type: ignore[no-untyped-call]
    return changed


def options_error(message: str) -> exceptions.OptionsError:
    return exceptions.OptionsError(message)  # type: ignore[no-untyped-call]
