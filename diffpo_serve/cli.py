"""``diffpo-serve`` / ``python -m diffpo_serve``: flags over ``DIFFPO_*`` variables, then uvicorn.

Flags are generated from :class:`~diffpo_serve.settings.ServerSettings` (one flag per field, its
environment variable and default in the help). SIGTERM or Ctrl-C drains (:class:`DrainingServer`):
the app answers new requests with 503 ``draining`` while running ones get up to ``--drain-timeout``
seconds, then the process exits with status 0. A model that cannot be loaded ends it with status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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


# seconds uvicorn gives the responses still open after the drain (the drain failed what was left) to go out
CLOSE_GRACE = 5


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the app's drain in front of its shutdown.

    The first SIGTERM / SIGINT starts :meth:`ServerRuntime.drain` while the listener stays open (new requests
    get 503 ``draining``); when it ends (all done, or ``--drain-timeout`` ran out and the rest failed with the
    envelope) uvicorn shuts down: closes the listener, gives open responses up to :data:`CLOSE_GRACE` seconds,
    runs the lifespan shutdown. A second signal skips the rest of the drain (a third SIGINT: uvicorn's force
    quit). Unlike plain uvicorn, the process is not re-killed by the signal afterwards: it exits with status 0.
    """

    def __init__(self, config: uvicorn.Config, runtime: ServerRuntime):
        super().__init__(config)
        self.runtime = runtime
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        self.runtime.begin_drain()
        if self._draining or self._loop is None or self._loop.is_closed():
            return super().handle_exit(sig, frame)
        self._draining = True
        self._loop.call_soon_threadsafe(self._start_drain)  # safe from a signal handler or another thread

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self.runtime.drain()
        finally:
            self.should_exit = True

    @contextlib.contextmanager
    def capture_signals(self):
        """uvicorn's handlers, without its re-raising of the captured signal once served (exit status 0)."""
        with super().capture_signals():
            yield
            self._captured_signals.clear()


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
                            lifespan="on", timeout_graceful_shutdown=CLOSE_GRACE)
    server = DrainingServer(config, app.state.runtime)
    server.run()
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
