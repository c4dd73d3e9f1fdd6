/*
 * cli — the client subcommands `archmirror platforms IMAGE…` and
 * `archmirror audit --require PLATFORM [FILE|-]`, which ask a running archmirror's
 * platform API and print a table (or --json).
 *
 * These run in the command's own process, not in the server, so they use plain blocking
 * sockets. `audit` exits 1 when any image misses a required platform, so it drops into
 * CI; 2 for bad usage; 3 when the server cannot be reached or answers an error.
 */
#ifndef ARCHMIRROR_CLI_H
#define ARCHMIRROR_CLI_H

/* Whether argv[1] names a client subcommand. */
int am_cli_is_command(int argc, char **argv);
/* Runs it; returns the process exit status. */
int am_cli_main(int argc, char **argv);

#endif
