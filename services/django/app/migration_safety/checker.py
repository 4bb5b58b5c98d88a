"""Which pending migrations break the release that is still running.

During every deploy the live release (N) and the new one (N+1) serve side by side against
the schema the new release's migrations made. A migration is *breaking* when release N's
code stops working on that schema: a table or column it reads or writes is dropped or
renamed, or a column it does not fill becomes NOT NULL without a default in the database.

The check reads the operations of each migration that `migrate` would apply (the ones not
recorded in django_migrations, or every one with `--all`), with the project state before
each operation, so columns and tables are the real ones (`db_column`, `db_table`):

  RemoveField, DeleteModel                 drops a column / table N reads
  RenameField, RenameModel, AlterModelTable renames a column / table (when its db name changes)
  AlterField                               renames the column, makes it NOT NULL without a
                                           db_default, or changes its type (a CharField that
                                           only grows is fine)
  AddField                                 NOT NULL without db_default (N's INSERTs omit it;
                                           Django's `default=` is dropped from the column
                                           once it is added)
  AlterOrderWithRespectTo                  removing it drops the `_order` column
  RunSQL                                   SQL with DROP, RENAME, TRUNCATE or SET NOT NULL
                                           (a conservative reading of the text)
  SeparateDatabaseAndState                 its database operations, as above

Everything else (CreateModel, AddIndex, constraints, RunPython, nullable AddField ...) is
accepted. Only migrations of the project's own apps are checked (those under the project
folder); Django's and third-party apps' migrations are theirs to stage.

A breaking migration the author has staged (expand in release N, contract in N+1) is
marked on its class, with the reason:

    class Migration(migrations.Migration):
        aiia_safe = "contract: course.summary unread since release 4f3c2a1"
        operations = [migrations.RemoveField("course", "summary")]

The mark must start with "expand:" or "contract:" and say why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from django.db import migrations, models
from django.db.migrations.loader import MigrationLoader
from django.db.migrations.state import ProjectState

MARK = "aiia_safe"
MARK_PREFIXES = ("expand:", "contract:")
RISKY_SQL = re.compile(r"\b(DROP|RENAME|TRUNCATE)\b|\bSET\s+NOT\s+NULL\b", re.IGNORECASE)

SPLIT_DROP = (
    "split it: release N (expand) stops reading and writing it (a field to drop first becomes "
    "nullable or gets a db_default, and the code no longer uses it); release N+1 (contract) "
    'drops it with this migration, marked `{mark} = "contract: <what> unused since release N"`'
)
SPLIT_RENAME = (
    "split it: release N (expand) adds the new column or table and writes both, copying "
    "the data; "
    "release N+1 reads only the new one; a later release drops the old one, marked "
    '`{mark} = "contract: ..."` (or keep the database name: db_column / db_table)'
)
SPLIT_NOT_NULL = (
    "split it: give the column a database default (`db_default=...`) so release N's INSERTs "
    "still work, or add it nullable in release N (expand), fill it, and make it NOT NULL in "
    'release N+1 once every release writes it, marked `{mark} = "contract: ..."`'
)
SPLIT_TYPE = (
    "split it: release N (expand) adds a new column of the new type and writes both; release "
    'N+1 (contract) switches to it and drops the old one, marked `{mark} = "contract: ..."`'
)
SPLIT_SQL = (
    "if the release still running never reads what it changes, mark the migration "
    '`{mark} = "contract: ..."`; otherwise split it into expand (release N) and contract '
    "(release N+1)"
)


@dataclass(frozen=True)
class Finding:
    app: str
    migration: str
    operation: str  # RemoveField ...
    target: str  # course.summary
    problem: str  # what it does to the running release
    advice: str  # how to split it

    def message(self) -> str:
        return (
            f"{self.app}.{self.migration}: {self.operation} {self.target} {self.problem}, "
            f"which breaks the release still running during the deploy; "
            f"{self.advice.format(mark=MARK)}"
        )


class MarkError(ValueError):
    """A migration whose `aiia_safe` mark is not a reason ("expand: ..." / "contract: ...")."""


def safe_mark(migration) -> str | None:
    mark = getattr(migration, MARK, None)
    if mark is None:
        return None
    if not isinstance(mark, str) or not mark.strip().lower().startswith(MARK_PREFIXES):
        raise MarkError(
            f"{migration.app_label}.{migration.name}: {MARK} = {mark!r} is not a reason; "
            f'write {MARK} = "contract: <column> unused since release <commit>" '
            f'(or "expand: ...")'
        )
    rest = mark.strip().split(":", 1)[1].strip()
    if not rest:
        raise MarkError(
            f"{migration.app_label}.{migration.name}: {MARK} = {mark!r} gives no reason after "
            "the colon; say why the release still running does not use what it changes"
        )
    return mark.strip()


def project_app(loader: MigrationLoader, app_label: str, root: Path) -> bool:
    """Is `app_label` one of the project's own apps (its code under `root`)?"""
    from django.apps import apps

    try:
        path = Path(apps.get_app_config(app_label).path).resolve()
    except LookupError:
        return False
    return path.is_relative_to(root.resolve())


# -- one operation -------------------------------------------------------------------------


def _model(state: ProjectState, app: str, name: str):
    return state.apps.get_model(app, name)


def _column(state: ProjectState, app: str, model: str, field: str) -> tuple[str, str]:
    """(table, column) of a field in `state`; a many-to-many field answers its table."""
    m = _model(state, app, model)
    f = m._meta.get_field(field)
    if f.many_to_many:
        return f.remote_field.through._meta.db_table, ""
    return m._meta.db_table, f.column


def _where(table: str, column: str) -> str:
    return f"table {table}" if not column else f"column {table}.{column}"


def _managed(state: ProjectState, app: str, model: str) -> bool:
    opts = _model(state, app, model)._meta
    return opts.managed and not opts.proxy


def _sql_texts(sql) -> list[str]:
    if isinstance(sql, str):
        return [sql]
    out = []
    for item in sql or ():
        out.append(item if isinstance(item, str) else str(item[0]))
    return out


def _not_null_without_db_default(field) -> bool:
    return not field.null and field.db_default is models.NOT_PROVIDED


def check_operation(app: str, op, before: ProjectState, after: ProjectState):
    """(operation name, target, problem, advice) when `op` breaks the running release."""
    kind = op.__class__.__name__
    if isinstance(op, migrations.SeparateDatabaseAndState):
        state = before
        for inner in op.database_operations:
            nxt = state.clone()
            inner.state_forwards(app, nxt)
            found = check_operation(app, inner, state, nxt)
            if found:
                return found
            state = nxt
        return None
    if isinstance(op, migrations.RemoveField):
        if not _managed(before, app, op.model_name):
            return None
        table, column = _column(before, app, op.model_name, op.name)
        return (kind, f"{op.model_name}.{op.name}", f"drops {_where(table, column)}", SPLIT_DROP)
    if isinstance(op, migrations.DeleteModel):
        if not _managed(before, app, op.name):
            return None
        table = _model(before, app, op.name)._meta.db_table
        return (kind, op.name, f"drops table {table}", SPLIT_DROP)
    if isinstance(op, migrations.RenameField):
        old = _column(before, app, op.model_name, op.old_name)
        new = _column(after, app, op.model_name, op.new_name)
        if old == new or not _managed(before, app, op.model_name):
            return None
        return (
            kind,
            f"{op.model_name}.{op.old_name}",
            f"renames {_where(*old)} to {new[1] or new[0]}",
            SPLIT_RENAME,
        )
    if isinstance(op, (migrations.RenameModel, migrations.AlterModelTable)):
        name = op.old_name if isinstance(op, migrations.RenameModel) else op.name
        new_name = op.new_name if isinstance(op, migrations.RenameModel) else op.name
        if not _managed(before, app, name):
            return None
        old_table = _model(before, app, name)._meta.db_table
        new_table = _model(after, app, new_name)._meta.db_table
        if old_table == new_table:
            return None
        return (kind, name, f"renames table {old_table} to {new_table}", SPLIT_RENAME)
    if isinstance(op, migrations.AlterField):
        if not _managed(before, app, op.model_name):
            return None
        old_model, new_model = (_model(s, app, op.model_name) for s in (before, after))
        old = old_model._meta.get_field(op.name)
        new = new_model._meta.get_field(op.name)
        target = f"{op.model_name}.{op.name}"
        where = _where(old_model._meta.db_table, getattr(old, "column", "") or "")
        if old.many_to_many or new.many_to_many:
            return None
        if old.column != new.column:
            return (kind, target, f"renames {where} to {new.column}", SPLIT_RENAME)
        if old.null and _not_null_without_db_default(new):
            return (kind, target, f"makes {where} NOT NULL without a db_default", SPLIT_NOT_NULL)
        if old.__class__ is not new.__class__:
            return (
                kind,
                target,
                f"changes the type of {where} ({old.__class__.__name__} to "
                f"{new.__class__.__name__})",
                SPLIT_TYPE,
            )
        old_len, new_len = getattr(old, "max_length", None), getattr(new, "max_length", None)
        if old_len and new_len and new_len < old_len:
            return (kind, target, f"shortens {where} ({old_len} to {new_len})", SPLIT_TYPE)
        for attr in ("max_digits", "decimal_places"):
            if getattr(old, attr, None) != getattr(new, attr, None):
                return (kind, target, f"changes the type of {where} ({attr})", SPLIT_TYPE)
        return None
    if isinstance(op, migrations.AddField):
        if not _managed(before, app, op.model_name):
            return None
        field = _model(after, app, op.model_name)._meta.get_field(op.name)
        if field.many_to_many or not field.concrete or field.primary_key:
            return None
        if _not_null_without_db_default(field):
            table = _model(after, app, op.model_name)._meta.db_table
            return (
                kind,
                f"{op.model_name}.{op.name}",
                f"adds column {table}.{field.column} NOT NULL without a db_default",
                SPLIT_NOT_NULL,
            )
        return None
    if isinstance(op, migrations.AlterOrderWithRespectTo):
        old = _model(before, app, op.name)._meta.order_with_respect_to
        if old is not None and not op.order_with_respect_to:
            table = _model(before, app, op.name)._meta.db_table
            return (kind, op.name, f"drops column {table}._order", SPLIT_DROP)
        return None
    if isinstance(op, migrations.RunSQL):
        for text in _sql_texts(op.sql):
            hit = RISKY_SQL.search(text)
            if hit:
                first = " ".join(text.split())[:80]
                return (kind, repr(first), f"runs {hit.group(0).upper()} SQL", SPLIT_SQL)
        return None
    return None


# -- a whole plan --------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    checked: list[str]  # app.migration, in plan order
    findings: list[Finding]
    accepted: list[tuple[str, str]]  # (app.migration, its mark) breaking but marked safe


def pending(loader: MigrationLoader, everything: bool) -> list[tuple[str, str]]:
    """The migrations `migrate` would apply (all of them, in order, with `everything`)."""
    leaves = loader.graph.leaf_nodes()
    plan: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for leaf in leaves:
        for node in loader.graph.forwards_plan(leaf):
            if node in seen or (not everything and node in loader.applied_migrations):
                continue
            seen.add(node)
            plan.append(node)
    return plan


def check(loader: MigrationLoader, nodes: list[tuple[str, str]], root: Path) -> Report:
    findings, accepted, checked = [], [], []
    for app, name in nodes:
        if not project_app(loader, app, root):
            continue
        migration = loader.graph.nodes[(app, name)]
        mark = safe_mark(migration)  # a malformed mark is an error even if nothing breaks
        checked.append(f"{app}.{name}")
        state = loader.project_state((app, name), at_end=False)
        found_here = []
        for op in migration.operations:
            after = state.clone()
            op.state_forwards(app, after)
            found = check_operation(app, op, state, after)
            if found:
                found_here.append(Finding(app, name, *found))
            state = after
        if found_here and mark:
            accepted.append((f"{app}.{name}", mark))
        else:
            findings += found_here
    return Report(checked, findings, accepted)
