# make demo:  build lora_env if missing (or older than pyproject.toml), then train and render with
#             the embedded tiny model.
# make test:  the same environment, the SLURM packages the cluster tests need (as root, with apt:
#             tests/setup_slurm.sh), the reference pose detector's own environment
#             (tests/setup_reference.sh), the GPU onnxruntime wheel the tagger-gpu test installs
#             offline (tests/setup_wheels.sh), then ruff and the whole test suite.
#             The suite runs on one pytest-xdist worker per core (at most 4): tests/conftest.py
#             keeps the tests that share something made once on one worker.
# make check: the same environments, then ruff and the fast tests (no `slow` marker): the inner loop.
ENV := lora_env
BIN := $(ENV)/bin
STAMP := $(ENV)/.forge-stamp
PYTEST := $(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadgroup

.PHONY: demo test check lint setup

$(STAMP): pyproject.toml setup_forge.sh
	./setup_forge.sh
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/loraforge demo demo

test: $(STAMP)
	./tests/setup_slurm.sh
	./tests/setup_reference.sh
	./tests/setup_wheels.sh
	$(BIN)/ruff check src tests bench
	$(PYTEST)

check: $(STAMP)
	./tests/setup_reference.sh
	./tests/setup_wheels.sh
	$(BIN)/ruff check src tests bench
	$(PYTEST) -m "not slow and not slurm"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
