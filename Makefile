# BFMig: the two commands the README promises, and the pieces they are made of.
# Everything runs as root on Debian 12; `make demo` and `make test` install what they need.

SHELL := /bin/bash
CONFIG ?= Release

.PHONY: all deps build test demo bench fuzz packages clean lab-down

all: build

deps:
	scripts/install-deps

build: deps
	dotnet build BFMig.sln -c $(CONFIG)

## The whole test suite, exactly what CI runs.
test: build
	scripts/check-aot
	scripts/fuzz-smoke
	scripts/test

## The main job: two simulated hosts, a guest migrated there and back in every mode, a table.
demo: build
	lab/lab demo --quick

bench: build
	dotnet run -c Release --project bench/BFMig.Benchmarks -- replay 128

packages: build
	scripts/build-packages

fuzz: build
	scripts/fuzz-smoke 300

lab-down:
	lab/lab down

clean:
	rm -rf artifacts
	find . -name bin -o -name obj -type d -prune -exec rm -rf {} +
