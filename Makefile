# archmirror — the two commands a user needs: `make run` and `make test`.
# CMake does the building; this wrapper installs Debian packages and picks build dirs.

BUILD_PKGS := cmake gcc make pkg-config libuv1-dev liblmdb-dev libjansson-dev libssl-dev node-llhttp
TEST_PKGS  := libcmocka-dev docker-registry containerd skopeo curl openssl python3 python3-cryptography python3-yaml nginx
JOBS       ?= $(shell nproc 2>/dev/null || echo 2)
ARGS       ?=
CTEST_ARGS ?=

.PHONY: all build run test test-unit test-asan deps deps-test demo clean

all: build

# Installs what is missing (as root) or names the packages to install (otherwise).
deps:
	@./.ci/install-deps $(BUILD_PKGS)

deps-test:
	@./.ci/install-deps $(BUILD_PKGS) $(TEST_PKGS)

build/dev/Makefile:
	cmake -S . -B build/dev -DCMAKE_BUILD_TYPE=RelWithDebInfo -DAM_WERROR=ON

build: deps build/dev/Makefile
	cmake --build build/dev -j $(JOBS)

run: build
	./build/dev/archmirror $(ARGS)

build/asan/Makefile:
	cmake -S . -B build/asan -DCMAKE_BUILD_TYPE=Debug -DAM_WERROR=ON -DAM_SANITIZE=ON

# Every test, twice: an optimised -Werror build, then the same suite under ASan+UBSan.
test: deps-test build/dev/Makefile build/asan/Makefile
	cmake --build build/dev -j $(JOBS)
	cd build/dev && ctest --output-on-failure -LE slow $(CTEST_ARGS)
	cmake --build build/asan -j $(JOBS)
	cd build/asan && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
		ctest --output-on-failure -LE slow $(CTEST_ARGS)

test-unit: deps-test build/dev/Makefile
	cmake --build build/dev -j $(JOBS)
	cd build/dev && ctest --output-on-failure -L unit $(CTEST_ARGS)

demo: deps-test build
	/usr/bin/python3 tests/demo.py --archmirror ./build/dev/archmirror

clean:
	rm -rf build

# Fuzzing (tests/fuzz/): clang + libFuzzer + ASan/UBSan in build/fuzz; each target runs
# FUZZ_SECONDS with its dictionary, new inputs going to build/fuzz/corpus/<name> (the
# committed seeds in tests/fuzz/<name>/corpus are read, never written). Crashes land in
# build/fuzz/artifacts/<name>/. FUZZ_TARGETS picks a subset: make fuzz FUZZ_TARGETS=route
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= route reference digest manifest wwwauth config mediatype tokenauth httpserver upstream range
FUZZ_CC      ?= $(shell command -v clang-14 || command -v clang)

.PHONY: fuzz
build/fuzz/Makefile:
	@test -n "$(FUZZ_CC)" || { echo "make fuzz needs clang: apt-get install clang"; exit 1; }
	CC=$(FUZZ_CC) cmake -S . -B build/fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DAM_FUZZ=ON

fuzz: deps-test build/fuzz/Makefile
	cmake --build build/fuzz -j $(JOBS) --target fuzz_targets
	@set -e; for t in $(FUZZ_TARGETS); do \
		mkdir -p build/fuzz/corpus/$$t build/fuzz/artifacts/$$t; \
		echo "== fuzz_$$t for $(FUZZ_SECONDS)s"; \
		./build/fuzz/tests/fuzz/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -timeout=10 \
			-rss_limit_mb=2048 -print_final_stats=1 -dict=tests/fuzz/$$t.dict \
			-artifact_prefix=build/fuzz/artifacts/$$t/ \
			build/fuzz/corpus/$$t tests/fuzz/$$t/corpus 2>&1 | grep -E '^#[0-9]+[[:space:]]+DONE|ERROR|SUMMARY|stat::' ; \
		test -z "$$(ls build/fuzz/artifacts/$$t)" || { echo "fuzz_$$t: crash in build/fuzz/artifacts/$$t"; exit 1; }; \
	done

# linux/arm64 without arm64 hardware (deploy/cross/): cross-compile archmirror and its unit
# tests with Debian's crossbuild-essential-arm64 and the :arm64 -dev packages into
# build/arm64, run the unit tests under qemu-aarch64-static (CMAKE_CROSSCOMPILING_EMULATOR),
# then run ARM64_IT integration tests against the arm64 binary (through a qemu wrapper).
# Not part of `make test`.
ARM64_IT ?= test_containerd_pull test_deploy
.PHONY: test-arm64
build/arm64/Makefile:
	cmake -S . -B build/arm64 -DCMAKE_TOOLCHAIN_FILE=deploy/cross/aarch64-linux-gnu.cmake \
		-DCMAKE_BUILD_TYPE=RelWithDebInfo -DAM_WERROR=ON

test-arm64: deps-test
	@./deploy/cross/install-deps-arm64
	@$(MAKE) --no-print-directory build/arm64/Makefile
	cmake --build build/arm64 -j $(JOBS)
	cd build/arm64 && ctest --output-on-failure -L unit $(CTEST_ARGS)
	@printf '#!/bin/sh\nexec %s %s "$$@"\n' "$$(command -v qemu-aarch64-static)" "$(CURDIR)/build/arm64/archmirror" > build/arm64/archmirror-qemu
	@chmod +x build/arm64/archmirror-qemu
	@set -e; for t in $(ARM64_IT); do \
		echo "== $$t against build/arm64/archmirror under qemu-aarch64-static"; \
		ARCHMIRROR_BIN=$(CURDIR)/build/arm64/archmirror-qemu AM_SOURCE_DIR=$(CURDIR) \
			PYTHONDONTWRITEBYTECODE=1 /usr/bin/python3 tests/integration/$$t.py; \
	done
	cmake --build build/arm64 -j $(JOBS) --target loadgen
	@printf '#!/bin/sh\nexec %s %s "$$@"\n' "$$(command -v qemu-aarch64-static)" "$(CURDIR)/build/arm64/bench/loadgen" > build/arm64/loadgen-qemu
	@chmod +x build/arm64/loadgen-qemu
	@echo "== bench/run --smoke with the arm64 loadgen and archmirror under qemu-aarch64-static"
	/usr/bin/python3 bench/run --smoke --no-perf --no-pin --archmirror $(CURDIR)/build/arm64/archmirror-qemu \
		--loadgen $(CURDIR)/build/arm64/loadgen-qemu --out $(CURDIR)/build/arm64/bench-smoke \
		--work $(CURDIR)/build/arm64/bench-smoke-work

# Benchmark against nginx proxy_cache and distribution's proxy mode (bench/README.md):
# `make bench` (a few minutes), `make bench BENCH_ARGS=--quick` (~1 min),
# `make bench BENCH_ARGS="--scenarios manifest-get-c16 --rounds 5"`.
BENCH_PKGS := nginx docker-registry gnuplot-nox linux-perf util-linux python3
BENCH_ARGS ?=
.PHONY: bench
bench:
	@./.ci/install-deps $(BUILD_PKGS) $(BENCH_PKGS)
	@$(MAKE) --no-print-directory build/dev/Makefile
	cmake --build build/dev -j $(JOBS) --target archmirror loadgen
	/usr/bin/python3 bench/run $(BENCH_ARGS)

# valgrind memcheck of the integration suite (slow; not part of `make test`). build/valgrind
# is a Debug build without sanitizers; every archmirror the harness starts runs under
# build/valgrind/archmirror-valgrind, a wrapper that execs valgrind $(VALGRIND_OPTS): a
# memory error or a definitely-lost leak makes archmirror's exit status on SIGTERM 99,
# which the harness reports as a failure. ctest would point ARCHMIRROR_BIN at the plain
# binary, so each test file runs directly; its output goes to build/valgrind/<test>.log.
# VALGRIND_TESTS picks a subset: make test-valgrind VALGRIND_TESTS="test_bytes_exact"
VALGRIND_TESTS   ?= $(sort $(basename $(notdir $(wildcard tests/integration/test_*.py))))
VALGRIND_OPTS    ?= --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite --track-fds=no
VALGRIND_TIMEOUT ?= 1800
.PHONY: test-valgrind
build/valgrind/Makefile:
	cmake -S . -B build/valgrind -DCMAKE_BUILD_TYPE=Debug -DAM_WERROR=ON -DAM_SANITIZE=OFF

test-valgrind: deps-test build/valgrind/Makefile
	@./.ci/install-deps valgrind
	cmake --build build/valgrind -j $(JOBS) --target archmirror
	@printf '#!/bin/sh\nexec valgrind %s "%s" "$$@"\n' "$(VALGRIND_OPTS)" \
		"$(CURDIR)/build/valgrind/archmirror" > build/valgrind/archmirror-valgrind
	@chmod +x build/valgrind/archmirror-valgrind
	@failed=""; start=$$(date +%s); \
	for t in $(VALGRIND_TESTS); do \
		t0=$$(date +%s); \
		if ARCHMIRROR_BIN=$(CURDIR)/build/valgrind/archmirror-valgrind AM_SOURCE_DIR=$(CURDIR) \
			AM_BUILD_DIR=$(CURDIR)/build/valgrind PYTHONDONTWRITEBYTECODE=1 \
			timeout $(VALGRIND_TIMEOUT) /usr/bin/python3 tests/integration/$$t.py \
			> build/valgrind/$$t.log 2>&1; then r=ok; else r=FAILED; failed="$$failed $$t"; fi; \
		echo "== $$t: $$r in $$(( $$(date +%s) - t0 ))s (build/valgrind/$$t.log)"; \
	done; \
	echo "test-valgrind: $$(( $$(date +%s) - start ))s"; \
	test -z "$$failed" || { echo "test-valgrind failed:$$failed"; exit 1; }

# Soak (minutes; not part of `make test`): archmirror against a seeded registry takes
# SOAK_REQUESTS warm manifest/blob requests and sha256-verified pulls from bench/loadgen
# (or a Python client when loadgen is not built) while its VmRSS is sampled every second; it
# fails when any request fails, when RSS settles more than SOAK_MAX_GROWTH (+2 MiB for
# bounded buffers) above its warm-up peak, keeps growing with requests, or passes 64 MiB.
# 1M requests take ~20 s here; make soak SOAK_REQUESTS=10000000 runs ~3 min.
# (SoakTest in tests/integration/test_hostile_clients.py; skipped unless AM_SOAK_REQUESTS.)
SOAK_REQUESTS   ?= 1000000
SOAK_MAX_GROWTH ?= 0.10
.PHONY: soak
soak: deps-test build/dev/Makefile
	cmake --build build/dev -j $(JOBS) --target archmirror
	@cmake --build build/dev -j $(JOBS) --target loadgen || \
		echo "soak: no loadgen target; using the Python client"
	ARCHMIRROR_BIN=$(CURDIR)/build/dev/archmirror AM_BUILD_DIR=$(CURDIR)/build/dev \
		AM_SOAK_REQUESTS=$(SOAK_REQUESTS) AM_SOAK_MAX_GROWTH=$(SOAK_MAX_GROWTH) \
		PYTHONDONTWRITEBYTECODE=1 /usr/bin/python3 tests/integration/test_hostile_clients.py SoakTest
