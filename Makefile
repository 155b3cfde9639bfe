# The two commands of the README. Each sets up .venv on a fresh machine first.
#   make run    train the projector federatedly on the embedded toy default (ARGS="--set rounds=5" ...)
#   make test   run the test suite
.PHONY: setup run test bench clean-venv

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/fedsim run $(ARGS)

test: setup
	.venv/bin/python -m pytest $(PYTEST_ARGS)

bench: setup
	.venv/bin/fedsim bench $(ARGS)

clean-venv:
	rm -rf .venv
