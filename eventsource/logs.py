"""
Logs for machines: ``--log-format json`` writes one JSON object per line.

Each line is one ``twisted.logger`` event, flat, as log shippers (Vector,
Fluent Bit, Promtail, Filebeat) read it without a parser of their own::

    {"time": "2026-11-29T22:06:01.123456Z", "level": "info",
     "namespace": "eventsource.service", "message": "stream r1 ended after 3 rows",
     "format": "stream {channel} {state} after {rows} rows{reason}",
     "channel": "r1", "state": "ended", "rows": 3, "reason": ""}

``message`` is the line the text format shows, ``format`` its template (one
value per kind of event, to group by), and every keyword field of the log
call follows under its own name (a field named like one of the envelope's
keys gets ``field_`` in front).  A failure adds ``traceback``.  Values that
are not JSON (an exception, a Failure) are written as their ``repr``; fields
whose name says password, secret or token are written as ``"***"``, though
the server logs none.

Under ``twistd`` the format is chosen by :func:`use_json_under_twistd`, which
:class:`eventsource.tap.Options` calls: it names :func:`json_observer` as
twistd's ``--logger``, so the JSON lines go where twistd would write its text
lines (standard output with ``--nodaemon`` or ``--logfile -``, else the
``--logfile``, ``twistd.log`` by default, rotated as twistd rotates it).
"""

import datetime
import json
import math
import sys
from typing import IO, Any, Callable, Dict, Mapping, MutableMapping, Optional

from twisted.logger import FileLogObserver, ILogObserver, LogEvent, formatEvent
from twisted.python.failure import Failure
from twisted.python.usage import UsageError

#: the keys every line has (``traceback`` only for a failure)
ENVELOPE = ("time", "level", "namespace", "message", "format", "traceback")

#: words in a field's name that mean its value is kept out of the log
SECRET_WORDS = ("password", "secret", "token", "passwd")

#: the fully qualified name twistd's ``--logger`` is set to
OBSERVER_NAME = "eventsource.logs.json_observer"


def _iso_time(seconds: Optional[float]) -> Optional[str]:
    if seconds is None:
        return None
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _plain(value: Any) -> Any:
    """``value`` if JSON writes it as it is, else its ``repr``."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    return repr(value)


def _is_secret(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in SECRET_WORDS)


def _legacy_copy(key: str, value: Any, event: LogEvent) -> bool:
    """
    Whether ``key`` is twisted.python.log's copy of what the envelope has
    (adbapi still logs through it, and its observers add these keys to
    every event they see).
    """
    if key in ("isError", "logLevel", "why", "failure"):
        return True
    if key == "message":
        return isinstance(value, tuple)
    if key == "format":
        return "log_legacy" in event or isinstance(event.get("message"), tuple)
    if key == "time":
        return bool(value == event.get("log_time"))
    if key == "system":
        return bool(value == "-")
    return False


def event_as_json(event: LogEvent) -> str:
    """One log event as one line of JSON (without the newline)."""
    level = event.get("log_level")
    record: Dict[str, Any] = {
        "time": _iso_time(event.get("log_time")),
        "level": getattr(level, "name", None),
        "namespace": event.get("log_namespace"),
        "message": formatEvent(event),
        "format": event.get("log_format"),
    }
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        record["traceback"] = failure.getTraceback()
    for key, value in event.items():
        if key.startswith("log_") or _legacy_copy(key, value, event):
            continue
        name = "field_" + key if key in ENVELOPE else key
        record[name] = "***" if _is_secret(key) else _plain(value)
    return json.dumps(record, ensure_ascii=False, default=repr, allow_nan=False)


def _line(event: LogEvent) -> str:
    try:
        return event_as_json(event) + "\n"
    except Exception as error:  # (a log line must never take the server down)
        return json.dumps({"time": _iso_time(event.get("log_time")), "level": "error",
                           "namespace": __name__,
                           "message": f"could not write a log event as JSON: {error!r}"}) + "\n"


def json_file_observer(out_file: IO[Any]) -> ILogObserver:
    """An observer writing each event to ``out_file`` as one JSON line."""
    observer: ILogObserver = FileLogObserver(out_file, _line)
    return observer


# -- twistd ----------------------------------------------------------------

#: twistd's parsed options, kept by use_json_under_twistd for json_observer
_twistd_options: Optional[Mapping[str, Any]] = None


def use_json_under_twistd(twistd_options: MutableMapping[str, Any]) -> None:
    """
    Make twistd log in JSON: name :func:`json_observer` as its ``--logger``
    (twistd imports it by that name once the options are parsed, and calls
    it to make its initial log observer).

    @raise UsageError: when twistd is asked for syslog or a ``--logger`` of
        its own, which would leave no place for the JSON lines.
    """
    global _twistd_options
    if twistd_options.get("syslog"):
        raise UsageError("--log-format json writes to standard output or the --logfile, "
                         "not to syslog: leave out --syslog (or use --log-format text)")
    if twistd_options.get("logger"):
        raise UsageError("--log-format json and twistd's --logger both choose the log "
                         "observer: give one of them")
    twistd_options["logger"] = OBSERVER_NAME
    _twistd_options = twistd_options


def _rotate_on_sigusr1(rotate: Callable[[], object]) -> None:
    """Rotate the log file on SIGUSR1, as twistd does for its own, unless something else does."""
    import signal

    if signal.getsignal(signal.SIGUSR1):
        return

    def rotate_log(signum: int, frame: Any) -> None:
        from twisted.internet import reactor

        reactor.callFromThread(rotate)  # type: ignore[attr-defined]

    signal.signal(signal.SIGUSR1, rotate_log)


def json_observer() -> ILogObserver:
    """
    twistd's log observer factory for ``--log-format json``: JSON lines,
    where twistd would have written its text log.
    """
    from twisted.python.logfile import LogFile

    options: Mapping[str, Any] = _twistd_options or {}
    name = options.get("logfile") or ""
    nodaemon = bool(options.get("nodaemon"))
    out: IO[Any]
    if name == "-" or (not name and nodaemon):
        if not nodaemon:
            sys.exit("Daemons cannot log to stdout, exiting!")
        out = sys.stdout
    else:
        log_file = LogFile.fromFullPath(name or "twistd.log")  # type: ignore[no-untyped-call]
        _rotate_on_sigusr1(log_file.rotate)
        out = log_file
    return json_file_observer(out)
