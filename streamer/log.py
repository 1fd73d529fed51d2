"""Structured logging: one line per event, key=value (or JSON), secrets never written."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

# key=value, "key": "value" and Authorization headers whose values must never reach a log.
_SECRET = re.compile(
    r"(?i)\b(password|passwd|token|secret|api[_-]?key|key|authorization)"
    r"(\s*[=:]\s*|\"\s*:\s*\")(Bearer\s+)?([^\s,\"'&]+)"
)


def redact(text: str) -> str:
    return _SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(3) or ''}***", text)


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        msg = redact(record.getMessage())
        line = f"ts={ts}.{int(record.msecs):03d}Z level={record.levelname.lower()} " \
               f"logger={record.name} msg={msg}"
        if record.exc_info:
            line += " exc=" + redact(self.formatException(record.exc_info)).replace("\n", " | ")
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str = "info", fmt: str = "kv") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
