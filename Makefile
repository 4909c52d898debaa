# Quickstart targets. Each sets up .venv on first use (idempotent), then runs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; override for CUDA machines, e.g. make TORCH_SPEC=torch setup
TORCH_SPEC ?= torch==2.13.0
NODES ?= 4

.PHONY: setup demo test lint fuzz soak scale clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

setup: $(BIN)/.installed

demo: setup  ## a local swarm of $(NODES) node processes training the built-in GPT with DiLoCo
	$(BIN)/loco swarm --nodes $(NODES)

test: setup  ## lint + the full test suite (unit, in-process peers, real multi-process swarms)
	$(BIN)/ruff check node protocols optim scripts tests examples
	$(BIN)/pytest -n 3 --dist worksteal  # three workers (the swarm tests wait on their processes: two left a core idle), balanced to the end

fuzz: setup  ## 10^5 hostile frames against decode and a real transport: 0 crashes, bounded RSS and log
	$(BIN)/python scripts/fuzz.py --frames 100000

scale: setup  ## swarms of 16 node processes (DiLoCo agrees, NoLoCo exchanges) and the simulator against real 4/8-node swarms: ~7 min
	$(BIN)/pytest -m scale tests/test_scale.py

soak: setup  ## a kill storm: 50 SIGKILL + restart cycles in a 4-node swarm, against a fault-free run
	$(BIN)/python scripts/soak.py --nodes 4 --kills 50

lint: setup
	$(BIN)/ruff check node protocols optim scripts tests examples

clean:
	rm -rf $(VENV) runs .pytest_cache
