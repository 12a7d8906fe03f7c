# wsbcn_d2: `make demo` (main job) and `make test`; both set up .venv/ first when needed.
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.wsbcn_d2-setup

.PHONY: setup demo test
setup: $(STAMP)

# Re-run the set-up when the venv is missing or its recipe changed.
$(STAMP): setup.py tools/setup_env.sh
	bash tools/setup_env.sh
	touch $@

demo: $(STAMP)
	$(PY) tools/demo.py

test: $(STAMP)
	$(PY) -m pytest tests -q
