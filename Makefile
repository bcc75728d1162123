# The commands the README gives.  Settings come from the environment
# (REDIS_*, MYSQL_*, EVENTSOURCE_*: see the README's table); extra
# arguments go in ARGS, e.g. `make run ARGS="--row-timeout=2"`.

PYTHON ?= python3
VENV := .venv
# The README's developer install: the compat mode keeps twisted/plugins on
# sys.path, which the default editable mode hides from twistd.
DEV_INSTALL := pip install -e . --config-settings editable_mode=compat

.PHONY: run cluster test lint bench config-table

## run: set up .venv and run the server in the foreground, against local Redis and MariaDB
run: $(VENV)/.installed
	exec $(VENV)/bin/twistd --nodaemon --pidfile= eventsource $(ARGS)

## cluster: set up .venv and run, in the foreground, a 3-node Galera cluster, a Redis master,
## replica and 3 Sentinels, and 3 server replicas (tests/clusters.py, on free loopback ports;
## needs galera-4, rsync, redis-server); prints how to point clients at it; Ctrl-C stops it all
cluster: $(VENV)/.installed
	exec $(VENV)/bin/python -m tests.clusters $(ARGS)

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m $(DEV_INSTALL)
	touch $@

## test: the whole suite, every Python found, lint and packaging checks
test:
	$(PYTHON) -m pip install -q 'tox>=4' && $(PYTHON) -m tox $(ARGS)

## lint: ruff check
lint:
	$(PYTHON) -m pip install -q 'tox>=4' && $(PYTHON) -m tox -e lint

## bench: install the package into $(PYTHON) and run the benchmark (benchmarks/, not in the wheel)
bench:
	$(PYTHON) -m $(DEV_INSTALL) -q && $(PYTHON) -m benchmarks $(ARGS)

## config-table: print the README's configuration table from the real options
config-table:
	@$(PYTHON) -c 'from eventsource.tap import settings_table; print(settings_table())'
