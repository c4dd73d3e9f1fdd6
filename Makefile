# archmirror — the two commands a user needs: `make run` and `make test`.
# CMake does the building; this wrapper installs Debian packages and picks build dirs.

BUILD_PKGS := cmake gcc make pkg-config libuv1-dev liblmdb-dev libjansson-dev libssl-dev node-llhttp
TEST_PKGS  := libcmocka-dev docker-registry containerd skopeo curl openssl python3 python3-cryptography
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
