# CMake toolchain: cross-compile archmirror and its unit tests for linux/arm64 (aarch64)
# on a Debian 12 amd64 machine, and run the tests under qemu-user.
#
#   dpkg --add-architecture arm64 && apt-get update
#   apt-get install crossbuild-essential-arm64 qemu-user-static \
#       libuv1-dev:arm64 liblmdb-dev:arm64 libjansson-dev:arm64 libssl-dev:arm64 libcmocka-dev:arm64
#   cmake -S . -B build/arm64 -DCMAKE_TOOLCHAIN_FILE=deploy/cross/aarch64-linux-gnu.cmake
#   cmake --build build/arm64 && (cd build/arm64 && ctest -L unit)
#
# (`make test-arm64` does all of it; deploy/cross/install-deps-arm64 does the apt part.)
# The :arm64 -dev packages are Debian multiarch: libraries in /usr/lib/aarch64-linux-gnu,
# headers shared in /usr/include (arch-specific ones in /usr/include/aarch64-linux-gnu).
# llhttp is compiled from Debian's architecture-independent node-llhttp sources.

set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_LIBRARY_ARCHITECTURE aarch64-linux-gnu)

set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)

# Debian has no aarch64-linux-gnu-pkg-config wrapper by default: point the host pkg-config
# at the arm64 .pc files only, so an amd64 library can never be picked up by mistake.
set(ENV{PKG_CONFIG_LIBDIR} "/usr/lib/aarch64-linux-gnu/pkgconfig:/usr/share/pkgconfig")
set(ENV{PKG_CONFIG_PATH} "")

# Libraries and headers: search the arm64 multiarch directories, never the host's.
# (find_library with CMAKE_LIBRARY_ARCHITECTURE looks in /usr/lib/aarch64-linux-gnu first;
# programs such as the compiler, pkg-config and qemu are host programs.)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_IGNORE_PATH /usr/lib/x86_64-linux-gnu /lib/x86_64-linux-gnu)

# ctest runs every test executable through this (add_test with a target as COMMAND).
# -L: the arm64 dynamic loader and libc of libc6:arm64 (/lib/ld-linux-aarch64.so.1, found
# through the host's /etc/ld.so.conf.d/aarch64-linux-gnu.conf) are used as they are.
find_program(AM_QEMU_AARCH64 NAMES qemu-aarch64-static qemu-aarch64)
if(AM_QEMU_AARCH64)
  set(CMAKE_CROSSCOMPILING_EMULATOR "${AM_QEMU_AARCH64}")
endif()
