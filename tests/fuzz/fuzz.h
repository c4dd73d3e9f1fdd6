/*
 * fuzz — what every fuzz target in tests/fuzz/ shares: the libFuzzer entry point's
 * prototype (the targets are built both with libFuzzer and with replay_main.c, under
 * -Wmissing-prototypes) and an invariant check that crashes loudly.
 *
 * A target must never exit, never keep state from one input to the next (beyond one-time
 * setup), and never touch the network beyond loopback.
 */
#ifndef ARCHMIRROR_FUZZ_H
#define ARCHMIRROR_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* A property the code under test promised was broken: that is a bug, so crash (the
 * fuzzer records the input, the replay test fails). Not assert(): NDEBUG builds too. */
#define FUZZ_CHECK(cond)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: fuzz invariant failed: %s\n", __FILE__, __LINE__, #cond);      \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

#endif
