"""archmirror integration-test harness (Python 3 standard library + Debian python3-*).

Modules:
  proc        free ports, spawning processes into their own process group, readiness
              polling, stopping by PID, and an atexit safety net.
  httpc       small http.client helpers used by the tests.
  images      deterministic image generators (layers, configs, manifests, indexes).
  registry    Debian docker-registry (distribution 2.8) runner + an OCI push client.
  tlsutil     CA / server certificates made with the openssl CLI.
  tokenissuer docker token-spec issuer (JWT ES256) for `auth: token` registries.
  faultproxy  counting / byte-flipping / "down" HTTP proxy in front of a registry.
  containerd  a private containerd daemon and `ctr images pull --hosts-dir` driver.
  archmirror  runs the archmirror binary under test with sanitizer checks.
  testbase    unittest base classes gluing the above together.
"""
