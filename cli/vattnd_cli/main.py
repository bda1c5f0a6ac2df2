"""The ``vattnd`` command: start the daemon, look at it.

Exit codes: 0 success; 1 the daemon could not start (the message says why);
2 bad usage; 3 no daemon answers on the socket.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time

import click

import vattnd
from vattn.paths import default_socket

EXIT_START_FAILED = 1
EXIT_UNREACHABLE = 3


class SizeParam(click.ParamType):
    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        from vattnd.units import parse_size

        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SIZE = SizeParam()


def _size_value(text: str) -> int:
    from vattnd.units import parse_size

    return parse_size(text)


def _pairs(values, shape: str, convert) -> dict:
    """Repeatable NAME=VALUE options (an environment variable may hold several, space-separated)."""
    out = {}
    for value in values:
        for item in str(value).split():
            name, sep, rest = item.partition("=")
            if not sep or not name:
                raise click.BadParameter(f"{item!r}: write {shape}")
            try:
                out[name] = convert(rest)
            except ValueError as exc:
                raise click.BadParameter(f"{item!r}: {exc}; write {shape}") from None
    return out


def _devices(ctx, param, value):
    if value in (None, "", "all"):
        return None
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give GPU indexes separated by commas, e.g. 0,1, or 'all'") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(vattnd.__version__, prog_name="vattnd")
def cli() -> None:
    """vattnd: a node daemon that owns KV-cache memory and maps it into LLM workers."""


def _load_config(ctx: click.Context, param, value):
    """--config FILE: a TOML file whose keys are start's long flags (pool-size = "60GiB", quota = [...]).

    Precedence: command line, then environment variables, then this file, then defaults.
    """
    if not value:
        return value
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(value, "rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise click.BadParameter(f"cannot read {value}: {exc}") from None
    flags = {opt.lstrip("-"): p.name for p in ctx.command.params for opt in p.opts if opt.startswith("--")}
    unknown = sorted(set(data) - set(flags) - {"config"})
    if unknown:
        raise click.BadParameter(
            f"{value}: unknown keys {', '.join(unknown)}; valid keys are {', '.join(sorted(k for k in flags if k != 'config'))}"
        )
    defaults = {}
    for key, item in data.items():
        if key != "config":
            defaults[flags[key]] = [str(x) for x in item] if isinstance(item, list) else str(item)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


@cli.command()
@click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False, callback=_load_config,
              envvar="VATTND_CONFIG", help="TOML file of settings; keys are the long flags (e.g. pool-size = \"60GiB\").")
@click.option("--socket", "socket_path", envvar="VATTND_SOCKET", default=default_socket, show_default="$XDG_RUNTIME_DIR/vattnd/vattnd.sock or /run/vattnd/vattnd.sock",
              help="gRPC Unix socket to listen on; the fd channel listens at SOCKET.fd.")
@click.option("--backend", envvar="VATTND_BACKEND", type=click.Choice(["auto", "host", "cuda"]), default="auto",
              show_default=True, help="auto: cuda when a GPU is usable, else host memory.")
@click.option("--pool-size", envvar="VATTND_POOL_SIZE", type=SIZE, default=None,
              help="Pool per device, e.g. 4GiB. [default: 1GiB on host, half of each GPU's memory]")
@click.option("--page-size", envvar="VATTND_PAGE_SIZE", type=SIZE, default="2MiB", show_default=True,
              help="Physical page size (a multiple of 2MiB on CUDA, of 4KiB on host).")
@click.option("--devices", envvar="VATTND_DEVICES", callback=_devices, default="all", show_default=True,
              help="GPUs to serve, e.g. 0,1.")
@click.option("--metrics-port", envvar="VATTND_METRICS_PORT", type=click.IntRange(-1, 65535), default=9464,
              show_default=True, help="Prometheus endpoint port; 0 picks a free one, -1 turns it off.")
@click.option("--metrics-host", envvar="VATTND_METRICS_HOST", default="127.0.0.1", show_default=True,
              help="Address the metrics endpoint binds.")
@click.option("--log-level", envvar="VATTND_LOG_LEVEL", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True)
@click.option("--log-format", envvar="VATTND_LOG_FORMAT", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="json: one JSON object per line, for log collectors.")
@click.option("--quota", "quotas", multiple=True, callback=lambda c, p, v: _pairs(v, "TENANT=SIZE", _size_value),
              help="A tenant's quota, e.g. teamA=20GiB (repeatable; VATTND_QUOTA, space-separated).",
              envvar="VATTND_QUOTA")
@click.option("--reserve", "reserves", multiple=True, callback=lambda c, p, v: _pairs(v, "TENANT=SIZE", _size_value),
              help="Memory kept for a tenant, e.g. teamA=20GiB (repeatable; VATTND_RESERVE): lent to others "
                   "while it does not use it; while it waits for it, others open no new slots with it.",
              envvar="VATTND_RESERVE")
@click.option("--priority", "priorities", multiple=True, callback=lambda c, p, v: _pairs(v, "TENANT=N", int),
              help="A tenant's priority; lower ones give idle pages back first (repeatable).",
              envvar="VATTND_PRIORITY")
@click.option("--tenant-uids", multiple=True, envvar="VATTND_TENANT_UIDS",
              callback=lambda c, p, v: _pairs(v, "TENANT=UID[:UID...]", lambda x: {int(u) for u in x.split(":")}),
              help="Only these Unix uids may open sessions for TENANT, e.g. teamA=1001:1002 (repeatable).")
@click.option("--socket-group", envvar="VATTND_SOCKET_GROUP", default=None,
              help="Group given the worker sockets (mode 0660). [default: the daemon's]")
@click.option("--admin-group", envvar="VATTND_ADMIN_GROUP", default=None,
              help="Group that may use the admin socket (SOCKET.admin). [default: owner only]")
@click.option("--reuse-pages", envvar="VATTND_REUSE_PAGES", type=click.Choice(["session", "principal"]),
              default="session", show_default=True,
              help="Who gets a freed page back as it is: only the session that held it (others get it replaced "
                   "by a zeroed page), or also other sessions of the same Unix user and tenant.")
@click.option("--client-timeout", envvar="VATTND_CLIENT_TIMEOUT", type=click.FloatRange(0.1, 3600), default=5.0,
              show_default=True,
              help="Seconds a worker may keep the daemon waiting: to say Hello, or to read its replies; then its "
                   "connection (and session) is ended.")
@click.option("--max-connections-per-uid", envvar="VATTND_MAX_CONNECTIONS_PER_UID", type=click.IntRange(1, 1 << 20),
              default=512, show_default=True, help="Open fd-channel connections (sessions) one Unix user may hold.")
def start(socket_path, backend, pool_size, page_size, devices, metrics_port, metrics_host, log_level, log_format,
          quotas, reserves, priorities, tenant_uids, socket_group, admin_group, reuse_pages, client_timeout,
          max_connections_per_uid) -> None:
    """Run the daemon in the foreground until SIGTERM or SIGINT."""
    from vattnd.backends import start_early

    start_early(backend)  # first: the CUDA driver loads (0.5-1 s) while the daemon imports and listens
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, log_level.upper()), handlers=[handler])
    from vattnd.daemon import Config, Daemon, StartupError

    config = Config(
        socket=socket_path, backend=backend, pool_size=pool_size, page_size=page_size,
        metrics_port=None if metrics_port == -1 else metrics_port, metrics_host=metrics_host, devices=devices,
        quotas=quotas, reserves=reserves, priorities=priorities, tenant_uids=tenant_uids, socket_group=socket_group,
        admin_group=admin_group, reuse_pages=reuse_pages, client_timeout=client_timeout,
        max_connections_per_uid=max_connections_per_uid,
    )
    daemon = Daemon(config)
    signal.signal(signal.SIGTERM, lambda *_: daemon.request_stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.request_stop())
    try:
        daemon.start()
        daemon.wait()
    except (StartupError, OSError) as exc:
        daemon.stop()
        click.echo(f"vattnd: cannot start: {exc}", err=True)
        from vattnd.backends.cuda import early_start_done

        if not early_start_done(timeout=10.0):  # a driver whose cuInit hangs must not keep the process
            sys.stderr.flush()
            os._exit(EXIT_START_FAILED)
        sys.exit(EXIT_START_FAILED)


def _stats_or_exit(socket_path: str):
    import vattn
    from vattn.session import stats

    try:
        return stats(socket_path)
    except vattn.VattnError as exc:
        click.echo(f"vattnd: {exc}", err=True)
        sys.exit(EXIT_UNREACHABLE)


def stats_dict(reply) -> dict:
    """The stable JSON shape of ``vattnd stats --json`` (numbers are numbers)."""
    from vattn.v1 import vattn_pb2 as pb

    return {
        "version": reply.version,
        "backend": pb.Backend.Name(reply.backend).removeprefix("BACKEND_").lower(),
        "uptime_seconds": round(reply.uptime_seconds, 3),
        "pools": [
            {"device": p.device, "name": p.name, "page_size": p.page_size, "pages_total": p.pages_total,
             "pages_used": p.pages_used, "pages_free": p.pages_free, "pages_spare": p.pages_spare,
             "pages_idle": p.pages_idle}
            for p in reply.pools
        ],
        "sessions": [
            {"session_id": s.session_id, "pid": s.pid, "uid": s.uid, "gid": s.gid, "name": s.name,
             "tenant": s.tenant, "regions": s.regions, "pages": s.pages, "age_seconds": round(s.age_seconds, 3)}
            for s in reply.sessions
        ],
        "tenants": [tenant_dict(t) for t in reply.tenants],
    }


def tenant_dict(t) -> dict:
    return {"name": t.name, "pages": t.pages, "quota_pages": t.quota_pages if t.has_quota else None,
            "reserve_pages": t.reserve_pages, "waiting_for_reserve": t.waiting_for_reserve,
            "priority": t.priority, "sessions": t.sessions}


socket_option = click.option("--socket", "socket_path", envvar="VATTND_SOCKET", default=default_socket,
                             show_default="as for start", help="Socket of the daemon to ask.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


def _size(n: int) -> str:
    from vattnd.units import format_size

    return format_size(n)


def _uptime(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds < 86400 else f"{seconds / 86400:.1f} days"


@cli.command()
@socket_option
@json_option
def status(socket_path, as_json) -> None:
    """One-line health of the daemon and its pools."""
    reply = _stats_or_exit(socket_path)
    if as_json:
        summary = stats_dict(reply)
        summary["sessions"] = len(reply.sessions)
        summary["tenants"] = len(reply.tenants)
        click.echo(json.dumps(summary, indent=2))
        return
    from vattn.v1 import vattn_pb2 as pb

    backend = pb.Backend.Name(reply.backend).removeprefix("BACKEND_").lower()
    click.echo(f"vattnd {reply.version} on {socket_path}: up {_uptime(reply.uptime_seconds)}, "
               f"backend {backend}, {len(reply.sessions)} sessions")
    for p in reply.pools:
        pct = 100.0 * p.pages_used / p.pages_total if p.pages_total else 0.0
        click.echo(f"  device {p.device} ({p.name}): {p.pages_used}/{p.pages_total} pages used ({pct:.1f}%), "
                   f"{_size(p.pages_free * p.page_size)} free of {_size(p.pages_total * p.page_size)}")


@cli.command()
@socket_option
@json_option
def stats(socket_path, as_json) -> None:
    """Pools and sessions as tables (or JSON for scripts)."""
    reply = _stats_or_exit(socket_path)
    if as_json:
        click.echo(json.dumps(stats_dict(reply), indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    pools = Table(title="Pools", title_justify="left")
    for col in ("device", "name", "page size", "total", "used", "spare", "free", "used %"):
        pools.add_column(col, justify="right" if col not in ("name",) else "left")
    for p in reply.pools:
        pct = 100.0 * p.pages_used / p.pages_total if p.pages_total else 0.0
        pools.add_row(str(p.device), p.name, _size(p.page_size), f"{p.pages_total} ({_size(p.pages_total * p.page_size)})",
                      str(p.pages_used), str(p.pages_spare), str(p.pages_free), f"{pct:.1f}")
    console.print(pools)
    page_size = reply.pools[0].page_size if reply.pools else 0
    tenants = Table(title="Tenants", title_justify="left")
    for col in ("tenant", "sessions", "pages", "memory", "quota", "reserve", "priority"):
        tenants.add_column(col, justify="left" if col == "tenant" else "right")
    for t in reply.tenants:
        quota = f"{t.quota_pages} ({_size(t.quota_pages * page_size)})" if t.has_quota else "none"
        reserve = (f"{t.reserve_pages} ({_size(t.reserve_pages * page_size)})"
                   + (", waiting" if t.waiting_for_reserve else "")) if t.reserve_pages else "none"
        tenants.add_row(t.name, str(t.sessions), str(t.pages), _size(t.pages * page_size), quota, reserve,
                        str(t.priority))
    console.print(tenants)
    sessions = Table(title="Sessions", title_justify="left")
    for col in ("id", "pid", "uid", "tenant", "name", "regions", "pages", "memory", "age"):
        sessions.add_column(col, justify="left" if col in ("name", "tenant") else "right")
    for s in reply.sessions:
        sessions.add_row(str(s.session_id), str(s.pid), str(s.uid), s.tenant, s.name, str(s.regions), str(s.pages),
                         _size(s.pages * page_size), _uptime(s.age_seconds))
    console.print(sessions)


@cli.group()
def quota() -> None:
    """Tenants' page quotas and priorities (through the admin socket)."""


@quota.command("set")
@click.argument("tenant")
@click.argument("size", required=False)
@click.option("--priority", type=int, default=None, help="Lower priorities give idle pages back first.")
@click.option("--reserve", "reserve", default=None,
              help="Memory kept for TENANT and lent to others while unused (e.g. 10GiB; 0 removes it).")
@socket_option
@json_option
def quota_set(tenant, size, priority, reserve, socket_path, as_json) -> None:
    """Set TENANT's quota to SIZE (e.g. 20GiB, or 'unlimited'); without SIZE, only --priority and --reserve
    change."""
    import vattn
    from vattn.session import set_quota

    if size is None and priority is None and reserve is None:
        raise click.UsageError("give a SIZE, a --priority, a --reserve, or several")
    try:
        quota_bytes = None if size in (None, "unlimited", "none") else _size_value(size)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="SIZE") from None
    try:
        reserve_bytes = None if reserve is None else 0 if reserve in ("0", "none") else _size_value(reserve)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--reserve") from None
    try:
        info = set_quota(tenant, quota_bytes, priority, socket_path, keep_quota=size is None,
                         reserve_bytes=reserve_bytes)
    except vattn.VattnError as exc:
        click.echo(f"vattnd: {exc}", err=True)
        sys.exit(EXIT_UNREACHABLE if isinstance(exc, vattn.Unavailable) else EXIT_START_FAILED)
    if as_json:
        click.echo(json.dumps(tenant_dict(info), indent=2))
    else:
        quota_text = f"{info.quota_pages} pages" if info.has_quota else "no quota"
        reserve_text = f", reserve {info.reserve_pages} pages" if info.reserve_pages else ""
        click.echo(f"tenant {info.name}: {quota_text}{reserve_text}, priority {info.priority}, "
                   f"holds {info.pages} pages")


@quota.command("list")
@socket_option
@json_option
def quota_list(socket_path, as_json) -> None:
    """Every tenant with its usage, quota and priority."""
    reply = _stats_or_exit(socket_path)
    if as_json:
        click.echo(json.dumps([tenant_dict(t) for t in reply.tenants], indent=2))
        return
    for t in reply.tenants:
        quota_text = f"{t.quota_pages} pages" if t.has_quota else "no quota"
        click.echo(f"{t.name}: {t.pages} pages held by {t.sessions} sessions; {quota_text}; priority {t.priority}")


def render_top(reply, previous, interval: float):
    """One frame of `vattnd top`: pools, tenants and sessions, with page rates since the last frame."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    page_size = reply.pools[0].page_size if reply.pools else 0
    pools = Table(title=f"vattnd {reply.version}: up {_uptime(reply.uptime_seconds)}", title_justify="left",
                  expand=True)
    for col in ("device", "name", "used", "", "spare", "idle", "free", "total"):
        pools.add_column(col, justify="left" if col in ("name", "") else "right")
    for p in reply.pools:
        bar = ProgressBar(total=max(1, p.pages_total), completed=p.pages_used, width=30)
        pools.add_row(str(p.device), p.name, _size(p.pages_used * p.page_size), bar, str(p.pages_spare),
                      str(p.pages_idle), _size(p.pages_free * p.page_size), _size(p.pages_total * p.page_size))
    tenants = Table(title="Tenants", title_justify="left", expand=True)
    for col in ("tenant", "sessions", "memory", "quota", "priority"):
        tenants.add_column(col, justify="left" if col == "tenant" else "right")
    for t in reply.tenants:
        quota = _size(t.quota_pages * page_size) if t.has_quota else "-"
        tenants.add_row(t.name, str(t.sessions), _size(t.pages * page_size), quota, str(t.priority))
    before = {s.session_id: s.pages for s in previous.sessions} if previous is not None else {}
    sessions = Table(title="Sessions", title_justify="left", expand=True)
    for col in ("id", "pid", "tenant", "name", "regions", "memory", "pages/s", "age"):
        sessions.add_column(col, justify="left" if col in ("tenant", "name") else "right")
    for s in sorted(reply.sessions, key=lambda s: -s.pages):
        rate = (s.pages - before[s.session_id]) / interval if s.session_id in before else 0.0
        sessions.add_row(str(s.session_id), str(s.pid), s.tenant, s.name, str(s.regions),
                         _size(s.pages * page_size), f"{rate:+.0f}", _uptime(s.age_seconds))
    return Group(pools, tenants, sessions)


@cli.command()
@socket_option
@click.option("--interval", type=click.FloatRange(0.1, 3600), default=1.0, show_default=True,
              help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="Print one frame and exit (for scripts and terminals without a TTY).")
def top(socket_path, interval, once) -> None:
    """A live view of pools, tenants and sessions (Ctrl-C to leave)."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    previous = _stats_or_exit(socket_path)
    if once:
        console.print(render_top(previous, None, interval))
        return
    try:
        with Live(render_top(previous, None, interval), console=console, screen=True,
                  refresh_per_second=max(1.0, 1 / interval)) as live:
            while True:
                time.sleep(interval)
                current = _stats_or_exit(socket_path)
                live.update(render_top(current, previous, interval))
                previous = current
    except KeyboardInterrupt:
        pass


def main() -> None:
    cli(prog_name="vattnd")


if __name__ == "__main__":
    main()
