"""The Invoke collection: one module per concern, each exporting its tasks."""

from invoke import Collection

namespace = Collection()

from aiia_ops.tasks import provision as _provision  # noqa: E402

namespace.add_task(_provision.provision)
namespace.add_collection(Collection("engine", _provision.engine_stop))

from aiia_ops.tasks import config as _config  # noqa: E402

namespace.add_collection(_config.namespace)

from aiia_ops.tasks import stack as _stack  # noqa: E402

for _task in (_stack.build, _stack.up, _stack.down, _stack.status, _stack.logs, _stack.setup):
    namespace.add_task(_task)

from aiia_ops.tasks import deploy as _deploy  # noqa: E402

for _task in (_deploy.deploy, _deploy.rollback, _deploy.migrate):
    namespace.add_task(_task)
namespace.add_collection(_deploy.lock)

from aiia_ops.tasks import backup as _backup  # noqa: E402

namespace.add_collection(_backup.namespace)
from aiia_ops.tasks import recover as _recover  # noqa: E402

_backup.namespace.add_task(_recover.media)
namespace.add_task(_recover.recover)
namespace.add_collection(_recover.secrets_ns)
from aiia_ops.tasks import pitr as _pitr  # noqa: E402

namespace.add_collection(_pitr.offsite)

from aiia_ops.tasks import tls as _tls  # noqa: E402

for _task in (_tls.ssl_renew, _tls.ssl_status):
    namespace.add_task(_task)

from aiia_ops.tasks import monitor as _monitor  # noqa: E402

namespace.add_task(_monitor.monitor)

from aiia_ops.tasks import apptest as _apptest  # noqa: E402

namespace.add_task(_apptest.test)

from aiia_ops.tasks import notify as _notify  # noqa: E402

namespace.add_task(_notify.notify)

from aiia_ops.tasks import schedule as _schedule  # noqa: E402

namespace.add_collection(_schedule.namespace)

from aiia_ops.tasks import logrotate as _logrotate  # noqa: E402

namespace.add_task(_logrotate.logrotate)

from aiia_ops.tasks import loadtest as _loadtest  # noqa: E402

namespace.add_task(_loadtest.loadtest)

from aiia_ops.tasks import k8s as _k8s  # noqa: E402

namespace.add_collection(_k8s.namespace)
from aiia_ops.tasks import lab as _lab  # noqa: E402

namespace.add_collection(_lab.namespace)

from aiia_ops.tasks import cluster as _cluster  # noqa: E402

namespace.add_collection(_cluster.namespace)

from aiia_ops.tasks import db as _db  # noqa: E402

namespace.add_collection(_db.namespace)
