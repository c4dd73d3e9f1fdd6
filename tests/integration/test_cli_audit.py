#!/usr/bin/python3
"""`archmirror platforms` and `archmirror audit`: the client subcommands against a running
archmirror (its POST /api/v1/platforms), their tables, --json and exit codes.

upstream: docker-registry seeded with seed_standard: example.com/library/multi:1.0 (OCI
index linux/amd64 + linux/arm64, attestation left out), example.com/library/list:1.0
(Docker list amd64, arm64, arm/v7), example.com/library/single:1.0 (single-arch amd64).
archmirror --upstream example.com=<registry>.

Exit codes (src/cli.c): audit 1 when an image misses a required platform, 0 when none;
2 bad usage; 3 server unreachable or answering an error (also a per-image lookup error
when nothing is missing). Table columns: IMAGE, MULTI, PLATFORMS, MISSING (audit).
"""
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import archmirror, proc, registry, testbase  # noqa: E402

REG = "example.com"
MULTI = "%s/library/multi:1.0" % REG
LIST = "%s/library/list:1.0" % REG
SINGLE = "%s/library/single:1.0" % REG
NOPE = "%s/library/nope:1.0" % REG


class CLIAuditTest(testbase.IntegrationCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        testbase.require_archmirror()
        cls.registry = cls.start_registry()
        cls.seeded = registry.seed_standard(cls.registry.client())
        cls.am = cls.start_archmirror(upstreams=[(REG, cls.registry.url)])
        cls.dead = proc.DeadPort()
        cls.addClassCleanup(cls.dead.close)

    # -- helpers ---------------------------------------------------------------------
    def cli(self, args, stdin=None, server=None, timeout=30):
        argv = [archmirror.binary()] + list(args)
        if server is not False:
            argv[2:2] = ["--server", server or self.am.url]
        cp = subprocess.run(argv, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, timeout=timeout)
        archmirror.Archmirror.check_sanitizers(cp.stderr)
        cp.ctx = "\n$ %s\nexit %d\nstdout:\n%s\nstderr:\n%s%s" % (
            " ".join(argv), cp.returncode, cp.stdout, cp.stderr, self.context())
        return cp

    def rows(self, cp):
        """{image: (multi, platforms list, missing list)} from the table."""
        lines = [l for l in cp.stdout.splitlines() if l.strip()]
        self.assertTrue(lines and lines[0].split()[:3] == ["IMAGE", "MULTI", "PLATFORMS"],
                        "no table header" + cp.ctx)
        out = {}
        for l in lines[1:]:
            parts = l.split()
            self.assertNotIn(parts[0], out, "image listed twice" + cp.ctx)
            if len(parts) > 1 and parts[1] == "ERROR":
                out[parts[0]] = ("ERROR", " ".join(parts[2:]), None)
                continue
            self.assertGreaterEqual(len(parts), 3, "short row %r%s" % (l, cp.ctx))
            missing = ",".join(parts[3:]).split(",") if len(parts) > 3 else []
            out[parts[0]] = (parts[1], parts[2].split(","), [m for m in missing if m])
        return out

    # -- audit -----------------------------------------------------------------------
    def test_audit_stdin_single_arch_missing(self):
        cp = self.cli(["audit", "--require", "linux/arm64", "-"],
                      stdin="%s %s\n%s\n" % (MULTI, LIST, SINGLE))
        self.assertEqual(cp.returncode, 1, cp.ctx)
        rows = self.rows(cp)
        self.assertEqual(set(rows), {MULTI, LIST, SINGLE}, cp.ctx)
        self.assertEqual(rows[SINGLE], ("no", ["linux/amd64"], ["linux/arm64"]), cp.ctx)
        self.assertEqual(rows[MULTI], ("yes", ["linux/amd64", "linux/arm64"], []), cp.ctx)
        self.assertEqual(rows[LIST], ("yes", ["linux/amd64", "linux/arm64", "linux/arm/v7"], []),
                         cp.ctx)

    def test_audit_multi_arch_only_ok(self):
        cp = self.cli(["audit", "--require", "linux/arm64"], stdin="%s\n%s\n" % (MULTI, LIST))
        self.assertEqual(cp.returncode, 0, cp.ctx)
        rows = self.rows(cp)
        self.assertEqual(set(rows), {MULTI, LIST}, cp.ctx)
        for img in (MULTI, LIST):
            self.assertEqual(rows[img][2], [], cp.ctx)

    def test_audit_several_requirements(self):
        both = ["audit", "--require", "linux/arm64", "--require", "linux/amd64"]
        cp = self.cli(both, stdin="%s %s %s" % (MULTI, LIST, SINGLE))
        self.assertEqual(cp.returncode, 1, cp.ctx)
        self.assertEqual(self.rows(cp)[SINGLE][2], ["linux/arm64"], cp.ctx)
        cp = self.cli(["audit", "--require", "linux/amd64"], stdin="%s %s %s" % (MULTI, LIST, SINGLE))
        self.assertEqual(cp.returncode, 0, "every image has amd64" + cp.ctx)
        # arm/v7: only the Docker list ships it
        cp = self.cli(["audit", "--require", "linux/arm/v7"], stdin="%s %s %s" % (MULTI, LIST, SINGLE))
        self.assertEqual(cp.returncode, 1, cp.ctx)
        rows = self.rows(cp)
        self.assertEqual(rows[MULTI][2], ["linux/arm/v7"], cp.ctx)
        self.assertEqual(rows[SINGLE][2], ["linux/arm/v7"], cp.ctx)
        self.assertEqual(rows[LIST][2], [], cp.ctx)

    def test_audit_file_argument_kubectl_style(self):
        """A file of whitespace-separated references, duplicates included (what
        `kubectl get pods -A -o jsonpath='{..image}'` prints): each image once."""
        path = os.path.join(self.workdir, "images.txt")
        with open(path, "w") as f:
            f.write("%s %s %s %s\t%s\n" % (MULTI, SINGLE, MULTI, LIST, SINGLE))
        cp = self.cli(["audit", "--require", "linux/arm64", path])
        self.assertEqual(cp.returncode, 1, cp.ctx)
        rows = self.rows(cp)
        self.assertEqual(set(rows), {MULTI, LIST, SINGLE}, cp.ctx)
        self.assertEqual(rows[SINGLE][2], ["linux/arm64"], cp.ctx)

    def test_audit_json(self):
        cp = self.cli(["audit", "--require", "linux/arm64", "--json", "-"],
                      stdin="%s %s %s" % (MULTI, LIST, SINGLE))
        self.assertEqual(cp.returncode, 1, cp.ctx)
        doc = json.loads(cp.stdout)
        self.assertEqual([r["image"] for r in doc["results"]], [MULTI, LIST, SINGLE], cp.ctx)
        self.assertEqual(doc["missing"], [{"image": SINGLE, "platforms": ["linux/arm64"]}],
                         cp.ctx)
        by = {r["image"]: r for r in doc["results"]}
        self.assertEqual(by[SINGLE]["digest"], self.seeded["single"][2]["top"].digest, cp.ctx)
        self.assertIsNone(by[SINGLE]["matches"]["linux/arm64"], cp.ctx)
        self.assertEqual(by[MULTI]["matches"]["linux/arm64"]["digest"],
                         self.seeded["multi"][2]["children"]["linux/arm64"]["manifest"].digest,
                         cp.ctx)
        cp = self.cli(["audit", "--require", "linux/arm64", "--json"], stdin=MULTI)
        self.assertEqual(cp.returncode, 0, cp.ctx)
        self.assertEqual(json.loads(cp.stdout)["missing"], [], cp.ctx)

    def test_audit_lookup_error(self):
        """An unknown tag gets its own ERROR row; with nothing missing the exit is 3 (an
        error, not a clean audit); with something missing it is 1."""
        cp = self.cli(["audit", "--require", "linux/arm64"], stdin="%s %s" % (MULTI, NOPE))
        self.assertEqual(cp.returncode, 3, cp.ctx)
        rows = self.rows(cp)
        self.assertEqual(rows[NOPE][0], "ERROR", cp.ctx)
        self.assertIn("MANIFEST_UNKNOWN", rows[NOPE][1], cp.ctx)
        self.assertEqual(rows[MULTI][2], [], cp.ctx)
        cp = self.cli(["audit", "--require", "linux/arm64"], stdin="%s %s" % (SINGLE, NOPE))
        self.assertEqual(cp.returncode, 1, cp.ctx)

    # -- platforms -------------------------------------------------------------------
    def test_platforms_table_and_json(self):
        cp = self.cli(["platforms", MULTI, LIST, SINGLE])
        self.assertEqual(cp.returncode, 0, cp.ctx)
        rows = self.rows(cp)
        self.assertEqual(rows[MULTI][:2], ("yes", ["linux/amd64", "linux/arm64"]), cp.ctx)
        self.assertEqual(rows[LIST][:2], ("yes", ["linux/amd64", "linux/arm64", "linux/arm/v7"]),
                         cp.ctx)
        self.assertEqual(rows[SINGLE][:2], ("no", ["linux/amd64"]), cp.ctx)
        cp = self.cli(["platforms", "--json", SINGLE])
        self.assertEqual(cp.returncode, 0, cp.ctx)
        doc = json.loads(cp.stdout)
        self.assertEqual(len(doc["results"]), 1, cp.ctx)
        r = doc["results"][0]
        self.assertEqual((r["image"], r["multiArch"]), (SINGLE, False), cp.ctx)
        self.assertEqual([p["platform"] for p in r["platforms"]], ["linux/amd64"], cp.ctx)

    # -- failures --------------------------------------------------------------------
    def test_unreachable_server_exit_3(self):
        for args, stdin in ((["audit", "--require", "linux/arm64"], MULTI),
                            (["platforms", MULTI], None)):
            with self.subTest(cmd=args[0]):
                cp = self.cli(args, stdin=stdin, server=self.dead.url, timeout=15)
                self.assertEqual(cp.returncode, 3, cp.ctx)
                self.assertIn("cannot connect", cp.stderr, cp.ctx)
                self.assertEqual(cp.stdout, "", cp.ctx)

    def test_server_answering_error_exit_3(self):
        """The "server" is the registry itself: 404 for /api/v1/platforms."""
        cp = self.cli(["audit", "--require", "linux/arm64"], stdin=MULTI,
                      server=self.registry.url)
        self.assertEqual(cp.returncode, 3, cp.ctx)
        self.assertIn("404", cp.stderr, cp.ctx)

    def test_bad_usage_exit_2(self):
        cases = [
            (["audit", "-"], MULTI),                                  # no --require
            (["audit"], MULTI),
            (["audit", "--require", "linux/arm64", "a.txt", "b.txt"], None),
            (["audit", "--require", "linux/arm64", "--bogus"], MULTI),
            (["platforms"], None),                                    # no image
        ]
        for args, stdin in cases:
            with self.subTest(args=args):
                cp = self.cli(args, stdin=stdin)
                self.assertEqual(cp.returncode, 2, cp.ctx)
                self.assertIn("usage:", cp.stderr, cp.ctx)
                self.assertEqual(cp.stdout, "", cp.ctx)
        cp = self.cli(["audit", "--require", "linux/arm64",
                       os.path.join(self.workdir, "no-such-file")])
        self.assertEqual(cp.returncode, 2, cp.ctx)
        self.assertIn("No such file", cp.stderr, cp.ctx)
        # usage errors need no server at all
        cp = self.cli(["audit", "-"], stdin=MULTI, server=self.dead.url)
        self.assertEqual(cp.returncode, 2, cp.ctx)


if __name__ == "__main__":
    testbase.main()
