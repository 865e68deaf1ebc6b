"""``diffpo-serve`` / ``python -m diffpo_serve``: flags over ``DIFFPO_*`` variables, then uvicorn.

Flags are generated from :class:`~diffpo_serve.settings.ServerSettings` (one flag per field, its
environment variable and default in the help). SIGTERM or Ctrl-C drains: the app answers new
requests with 503, uvicorn waits up to ``--drain-timeout`` seconds for running ones, then the
batcher stops. A model that cannot be loaded ends the process with exit status 1.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields, replace

import uvicorn

from diffpo_serve.api import ServerRuntime, create_app
from diffpo_serve.settings import ServerSettings, env_name, field_type


def build_parser(defaults: ServerSettings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffpo-serve",
        description="Serve a masked diffusion LM (default: the bundled model) behind an OpenAI-compatible API.")
    for f in fields(ServerSettings):
        default = getattr(defaults, f.name)
        shown = ("set" if default else "unset") if f.name == "api_key" else default
        help_text = f"{f.metadata['help']} [env {env_name(f.name)}; now: {shown}]"
        flag = "--" + f.name.replace("_", "-")
        typ = field_type(f.name)
        if typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=typ, default=default, metavar=f.name.upper(), help=help_text)
    return parser


def parse_settings(argv: list[str] | None = None, environ=None) -> ServerSettings:
    """Settings from flags over environment over defaults; exits with a usage error on bad values."""
    try:
        defaults = ServerSettings.from_env(environ)
    except ValueError as e:
        argparse.ArgumentParser(prog="diffpo-serve").error(str(e))
    parser = build_parser(defaults)
    args = parser.parse_args(argv)
    try:
        return replace(defaults, **vars(args)).validated()
    except ValueError as e:
        parser.error(str(e))


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the app to refuse new work as soon as a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, runtime: ServerRuntime):
        super().__init__(config)
        self.runtime = runtime

    def handle_exit(self, sig, frame) -> None:
        self.runtime.begin_drain()
        super().handle_exit(sig, frame)


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    failures: list[BaseException] = []
    server: DrainingServer | None = None

    def on_fatal(exc: BaseException) -> None:
        failures.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            lifespan="on", timeout_graceful_shutdown=int(settings.drain_timeout))
    server = DrainingServer(config, app.state.runtime)
    server.run()
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
