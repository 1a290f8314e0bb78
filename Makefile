# BFMig: the two commands the README promises, and the pieces they are made of.
# Everything runs as root on Debian 12; `make demo` and `make test` install what they need.

SHELL := /bin/bash
CONFIG ?= Release

.PHONY: all deps build test demo bench bench-big fuzz packages package-check clean lab-down

all: build

deps:
	scripts/install-deps

build: deps
	dotnet build BFMig.sln -c $(CONFIG)

## The whole test suite, exactly what CI runs. The package check runs even when a test failed
## (both add to artifacts/test-summary.txt); either failing fails `make test`.
test: build
	scripts/check-aot
	scripts/fuzz-smoke
	scripts/test; t=$$?; BFMIG_AFTER_TESTS=1 scripts/package-check; p=$$?; exit $$(( t || p ))

## The main job: two simulated hosts, a guest migrated there and back in every mode, a table.
demo: build
	lab/lab demo --quick

bench: build
	dotnet run -c Release --project bench/BFMig.Benchmarks -- replay 128

## A big guest's cost through the shipped (AOT) helper: CPU seconds per GiB and peak RSS of each
## side of a return trip; BIG_GIB of memory (two stores of that size under /tmp), BIG_CHANGED %.
BIG_GIB ?= 16
BIG_CHANGED ?= 10
bench-big: build
	dotnet publish src/Transfer/Helper -c Release -r linux-x64 -o bench/out/helper >/dev/null
	dotnet run -c Release --project bench/BFMig.Benchmarks -- replay-big bench/out/helper/bfmig-transfer $(BIG_GIB) $(BIG_CHANGED)

packages: build
	scripts/build-packages

## The packages' life cycle on this machine (install, doctor, lab trips, remove, purge).
package-check: build
	scripts/package-check

## Coverage-guided fuzzing (afl++ + SharpFuzz), FUZZ_SECONDS per target (CI runs only the
## mutation smoke run of `make test`); `make fuzz FUZZ_SECONDS=1800` for the documented long runs.
FUZZ_SECONDS ?= 300
fuzz: build
	scripts/fuzz-afl $(FUZZ_SECONDS)

lab-down:
	lab/lab down

clean:
	rm -rf artifacts
	find . -name bin -o -name obj -type d -prune -exec rm -rf {} +
