# make demo:  build lora_env if missing (or older than pyproject.toml), then train and render with
#             the embedded tiny model.
# make test:  the same environment, the SLURM packages the cluster tests need (as root, with apt:
#             tests/setup_slurm.sh), the reference pose detector's own environment
#             (tests/setup_reference.sh), the GPU onnxruntime wheel the tagger-gpu test installs
#             offline (tests/setup_wheels.sh), then ruff and the whole test suite.
# make check: the same environments, then ruff and the fast tests (no `slow` marker): the inner loop.
ENV := lora_env
BIN := $(ENV)/bin
STAMP := $(ENV)/.forge-stamp

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
	$(BIN)/python -m pytest -q

check: $(STAMP)
	./tests/setup_reference.sh
	./tests/setup_wheels.sh
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -q -m "not slow and not slurm"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
