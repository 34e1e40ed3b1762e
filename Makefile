# qtool developer entry points. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SAMPLE := sample_models/digits_cnn

.PHONY: install demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: install
	$(BIN)/qtool quantize $(SAMPLE)/model.onnx --recipe configs/int8.yaml \
		--data $(SAMPLE)/calib --validation-data $(SAMPLE)/eval --output out/demo --overwrite
	@echo "Report: out/demo/report.md"

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out .pytest_cache
