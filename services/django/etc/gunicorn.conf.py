"""Baked default gunicorn config, used only when no rendered config is mounted at
/etc/aiia/gunicorn.conf.py (e.g. a bare `docker run`). Deployments use the file rendered
from templates/gunicorn.conf.py.j2; these values mirror deploy/stack.yml's app.gunicorn,
with PORT and GUNICORN_WORKERS from the environment.
"""

import contextlib
import gc
import logging
import os
import sys

sys.setswitchinterval(0.0005)  # threads back from I/O get the GIL sooner (see the template)

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("GUNICORN_WORKERS", "2"))
threads = 4
worker_class = "gthread"
timeout = 30
graceful_timeout = 30
keepalive = 60
max_requests = 20000
max_requests_jitter = 2000
worker_tmp_dir = "/dev/shm"
preload_app = workers > 1  # saves memory only with several workers (see README.md)
accesslog = None  # nginx logs every request (stack.yml app.gunicorn.access_log)
errorlog = "-"
loglevel = "info"
access_log_format = '%({x-forwarded-for}i)s "%(r)s" %(s)s %(b)s %(M)sms'
control_socket_disable = True


def pre_fork(server, worker):
    gc.freeze()  # keep the master's objects shared copy-on-write (see the template)


def worker_exit(server, worker):
    # No interpreter teardown: it un-shares every page (see the template)
    exc = sys.exc_info()[1]
    code = exc.code if isinstance(exc, SystemExit) else 1
    if not isinstance(code, int):  # as sys.exit: None is 0, a message is 1
        code = 0 if code is None else 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code & 0xFF)
