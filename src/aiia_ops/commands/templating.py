"""The one jinja2 environment every config template renders in.

StrictUndefined: a template naming a value the model does not have fails, with the
template's name and line, instead of rendering an empty string into a config file.
Filters turn model values (Size, Duration, or their "64MB"/"30s" text) into each
program's own notation.
"""

from __future__ import annotations

from pathlib import Path

import jinja2

from aiia_ops.errors import OpsError
from aiia_ops.model.units import Duration, Size


def _size(v) -> Size:
    return Size.parse(v)


def _duration(v) -> Duration:
    return Duration.parse(v)


def nginx_size(v) -> str:
    s = _size(v)
    if s.bytes % 1024**2 == 0:
        return f"{s.bytes // 1024**2}m"
    if s.bytes % 1024 == 0:
        return f"{s.bytes // 1024}k"
    return str(s.bytes)


def pg_size(v) -> str:
    s = _size(v)
    if s.bytes % 1024**2 == 0:
        return f"{s.bytes // 1024**2}MB"
    return f"{max(1, round(s.bytes / 1024))}kB"


def pg_duration(v) -> str:
    d = _duration(v)
    return f"{d.whole_seconds}s" if d.seconds >= 1 and d.seconds.is_integer() else f"{int(d.ms)}ms"


FILTERS = {
    "bytes": lambda v: _size(v).bytes,
    "kb": lambda v: _size(v).kb,
    "mb": lambda v: _size(v).mb,
    "seconds": lambda v: _duration(v).whole_seconds,
    "ms": lambda v: _duration(v).ms,
    "nginx_size": nginx_size,
    "pg_size": pg_size,
    "pg_duration": pg_duration,
}


def environment(search_path: Path | str) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(search_path)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters.update(FILTERS)
    return env


def render_file(template: Path, **context) -> str:
    """Render one template file; errors name the template and line."""
    template = Path(template)
    try:
        return environment(template.parent).get_template(template.name).render(**context)
    except jinja2.UndefinedError as exc:
        line = _template_line(exc, template)
        raise OpsError(f"{template}{line}: {exc.message}") from None
    except jinja2.TemplateSyntaxError as exc:
        raise OpsError(f"{exc.filename or template}:{exc.lineno}: {exc.message}") from None


def _template_line(exc: Exception, template: Path) -> str:
    tb = exc.__traceback__
    line = ""
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == str(template):
            line = f":{tb.tb_lineno}"
        tb = tb.tb_next
    return line
