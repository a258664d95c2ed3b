# make demo: build lora_env if missing, then train and render with the embedded tiny model.
# make test: build lora_env if missing, then run the whole test suite.
ENV := lora_env
BIN := $(ENV)/bin

.PHONY: demo test lint setup

$(BIN)/loraforge:
	./setup_forge.sh

setup:
	./setup_forge.sh

demo: $(BIN)/loraforge
	$(BIN)/loraforge demo demo

test: $(BIN)/loraforge
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -q

lint: $(BIN)/loraforge
	$(BIN)/ruff check src tests bench
