"""Names that vulture (``bash scripts/deadcode.sh``) would report as unused but that a framework reads.

Never imported or run: vulture only parses it, and any use of a name here marks that name as used everywhere.
Decorated entry points (Flask routes and error handlers, Celery tasks and signal receivers, pydantic
validators) are ignored by decorator in scripts/deadcode.sh instead of being listed here.
"""

# ruff: noqa: B018, F821

# pydantic: model configuration, read by the metaclass
_.model_config
# pydantic response models (shared/responses.py): fields that document the API's answers in the OpenAPI
# document; the answers themselves are built as dicts
_.canceled_at
_.queued_s
_.total_s
_.classify
# prometheus-client: a Collector's describe() is called by the registry on register
_.describe
# gunicorn: server hooks, looked up by name in the config module (gateway/gunicorn_conf.py)
on_starting
child_exit
worker_exit
on_exit
# gunicorn: its error answers, replaced by gateway/gunicorn_conf.py's JSON writer
_.write_error
# urllib3: the connection class of a pool, and a pool manager's pool classes (shared/webhooks.py, the
# attempt deadline's connections)
ConnectionCls
_.pool_classes_by_scheme
# Celery and Flask settings assigned as attributes (cli/stack.py, gateway/app.py)
_.accept_content
_.sort_keys
# flask.g attribute, read back with g.get("mmfuse_metrics") (gateway/metrics.py)
_.mmfuse_metrics
