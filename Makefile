# The two set-up commands of the README. Both install what they need first.
PYTHON ?= python

.PHONY: install demo test

install:
	$(PYTHON) -m pip install -q -r requirements/cpu.txt
	DS_BUILD_OPS=0 $(PYTHON) -m pip install -q -e ".[all]"

demo: install
	lampretrain demo

test: install
	$(PYTHON) -m ruff check lampretrain tests setup.py
	$(PYTHON) -m pytest -q
