"""Test PKI with the openssl CLI: a CA, a server cert for 127.0.0.1/localhost signed by
it, and an unrelated second CA for "wrong CA" tests."""
import os

from . import proc

OPENSSL = "/usr/bin/openssl"


def make_ca(workdir, name="ca", cn="archmirror test CA"):
    """Returns (cert_path, key_path)."""
    key = os.path.join(workdir, name + ".key")
    crt = os.path.join(workdir, name + ".pem")
    proc.run([OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
              "-nodes", "-keyout", key, "-out", crt, "-days", "3", "-subj", "/CN=" + cn,
              "-addext", "basicConstraints=critical,CA:TRUE",
              "-addext", "keyUsage=critical,keyCertSign,cRLSign",
              "-addext", "subjectKeyIdentifier=hash"])
    return crt, key


def make_server_cert(workdir, ca, name="server", sans=("IP:127.0.0.1", "DNS:localhost")):
    """Server cert+key signed by ca=(cert, key). Returns (cert_path, key_path)."""
    ca_crt, ca_key = ca
    key = os.path.join(workdir, name + ".key")
    csr = os.path.join(workdir, name + ".csr")
    crt = os.path.join(workdir, name + ".pem")
    ext = os.path.join(workdir, name + ".ext")
    with open(ext, "w") as f:
        f.write("basicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth\n"
                "subjectKeyIdentifier=hash\n"
                "authorityKeyIdentifier=keyid\n"
                "subjectAltName=%s\n" % ",".join(sans))
    proc.run([OPENSSL, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
              "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"])
    proc.run([OPENSSL, "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key,
              "-CAcreateserial", "-out", crt, "-days", "2", "-extfile", ext])
    return crt, key


class PKI:
    """ca, server (signed by ca) and other_ca (unrelated) under <workdir>/pki."""

    def __init__(self, workdir):
        d = os.path.join(workdir, "pki")
        os.makedirs(d, exist_ok=True)
        self.dir = d
        self.ca_cert, self.ca_key = make_ca(d, "ca", "archmirror test CA")
        self.server_cert, self.server_key = make_server_cert(d, (self.ca_cert, self.ca_key))
        self.other_ca_cert, self.other_ca_key = make_ca(d, "other-ca", "unrelated test CA")
