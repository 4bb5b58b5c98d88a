"""The Invoke collection: one module per concern, each exporting its tasks."""

from invoke import Collection

namespace = Collection()
