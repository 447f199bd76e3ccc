# One entry point for the usual jobs. `make test` works on a machine with nothing but Python 3.11+.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint serve bench-model demo-model docs lock clean

# requirements.lock pins every dependency (pip-tools); `make lock` re-resolves it after a change to pyproject.toml.
$(STAMP): pyproject.toml requirements.lock
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements.lock -e '.[train,dev,otel]'
	touch $(STAMP)

lock: $(STAMP)
	$(BIN)/pip-compile -q --extra train --extra dev --extra otel --strip-extras --no-emit-find-links --no-emit-index-url \
		--no-emit-trusted-host -o requirements.lock pyproject.toml

docs: $(STAMP)
	$(BIN)/hytrec docs

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/yamllint --strict -c deploy/.yamllint.yml deploy
	$(BIN)/hadolint Dockerfile
	$(BIN)/hytrec ops render --check

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

serve: $(STAMP)
	$(BIN)/hytrec serve

bench-model: $(STAMP)
	$(BIN)/hytrec bench model --plot docs/benchmarks/model.png --markdown docs/benchmarks/model.md

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# The demo model bundled for the service's default run: trained on a synthetic log (no real data in the repo).
DEMO_RUN := var/demo-run
demo-model: $(STAMP)
	$(BIN)/hytrec synth --users 1000 --items 500 --events-per-user lognormal:200 --seed 7 --out $(DEMO_RUN)/synth.tsv.gz
	$(BIN)/hytrec train --data $(DEMO_RUN)/synth.tsv.gz --out $(DEMO_RUN)/model --epochs 12 --patience 3 --lr 1e-3 --batch-tokens 32768 \
		--state-dtype float16 --seed 0 --threads 1 --quiet
	mkdir -p models/demo
	cp $(DEMO_RUN)/model/model.safetensors $(DEMO_RUN)/model/config.json $(DEMO_RUN)/model/items.json \
		$(DEMO_RUN)/model/metrics.json models/demo/
	cp $(DEMO_RUN)/synth.items.tsv models/demo/catalogue.tsv  # synthetic genres: the demo's item metadata
