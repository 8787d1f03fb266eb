# The two set-up commands of the README. Both install what they need first.
PYTHON ?= python

.PHONY: install install-test demo test

install:
	$(PYTHON) -m pip install -q -r requirements/cpu.txt
	DS_BUILD_OPS=0 $(PYTHON) -m pip install -q -e ".[all]"

# the test tools and the peers: the equality tests against the official MatRIS run here instead of skipping
install-test: install
	DS_BUILD_OPS=0 $(PYTHON) -m pip install -q -e ".[all,test,peers]"

demo: install
	lampretrain demo

test: install-test
	$(PYTHON) -m ruff check lampretrain tests setup.py
	$(PYTHON) -m pytest -q
