# The two commands of the README: `make run` and `make test`. Everything else is plumbing.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# The same pin gives the CPU build here and a CUDA build on a GPU machine.
TORCH_SPEC ?= torch==2.13.0

.PHONY: run test lint setup clean browser

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

## Set up, then run the bot (or, with no DISCORD_TOKEN, the local playground on the tiny model).
run: setup
	$(BIN)/sdbot

## Set up, then lint, type-check and run the whole test suite.
test: setup lint browser
	$(BIN)/python -m pytest -q

# Debian's Chromium and ChromeDriver for the browser test of the playground page.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null \
		&& [ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq chromium chromium-driver fonts-noto-color-emoji >/dev/null; \
	else echo "note: install chromium and chromium-driver to run the browser test"; fi

lint: setup
	$(BIN)/ruff check bot cogs tests $(wildcard bench)
	$(BIN)/ruff format --check bot cogs tests $(wildcard bench)
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
